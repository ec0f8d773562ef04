"""The README stays a short first read, the docs stay linked together, and the benchmark
tables land in docs/benchmarks.md.

Links are checked the way GitHub renders them: a relative link must name a file of the
repository, and a ``#fragment`` must name a heading of its target (GitHub's slug: lower case,
punctuation dropped, spaces to hyphens, ``-1``, ``-2`` for repeats).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench import grpc_bench, tenk
from bench import run as bench_run
from router.core.config import from_mapping

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_MAX_LINES = 250

# Linked from the README, generated from the config schema on another branch. Until that
# branch lands the file is absent; once it is present it must leave this set, so that its
# links are checked like every other (the test below fails to say so).
_FENCE = re.compile(r"^(```|~~~)")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_CODE_SPAN = re.compile(r"`[^`]*`")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def _prose_lines(path: Path) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in path.read_text().splitlines():
        if _FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def _slug(heading: str) -> str:
    text = _CODE_SPAN.sub(lambda m: m.group(0).strip("`"), heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for line in _prose_lines(path):
        match = _HEADING.match(line)
        if match is None:
            continue
        slug = _slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def relative_links(path: Path) -> list[str]:
    links = []
    for line in _prose_lines(path):
        for target in _LINK.findall(_CODE_SPAN.sub("", line)):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:, ...
                links.append(target)
    return links


def test_readme_is_a_short_first_read() -> None:
    lines = README.read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move depth to docs/"


def test_the_docs_pages_exist() -> None:
    names = {page.name for page in DOCS}
    assert {"protocol.md", "operations.md", "benchmarks.md", "architecture.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files_and_headings(page: Path) -> None:
    broken = []
    for target in relative_links(page):
        file_part, _, fragment = target.partition("#")
        resolved = (page.parent / file_part).resolve() if file_part else page
        name = resolved.relative_to(ROOT).as_posix() if resolved.is_relative_to(ROOT) else None
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            broken.append(f"{target}: no heading #{fragment} in {name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_the_link_checker_sees_a_broken_link(tmp_path: Path) -> None:
    (tmp_path / "there.md").write_text("# A heading\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](there.md#a-heading) [gone](missing.md) [web](https://example.com)\n"
        "```\n[in code](also-missing.md)\n```\n`[span](nope.md)`\n"
    )
    assert relative_links(page) == ["there.md#a-heading", "missing.md"]
    assert anchors(tmp_path / "there.md") == {"a-heading"}
    assert _slug("Statuses and the `x-router-error` trailer") == (
        "statuses-and-the-x-router-error-trailer")
    assert _slug("10,000 clients") == "10000-clients"


def test_every_toml_example_in_the_readme_is_a_valid_config() -> None:
    import tomllib

    blocks = re.findall(r"^```toml\n(.*?)^```", README.read_text(), re.S | re.M)
    assert blocks, "the README shows a configuration example"
    for block in blocks:
        from_mapping(tomllib.loads(block), "README.md")  # raises ConfigError naming the key


# -- the bench scripts write their tables into docs/benchmarks.md ------------------------------

RESULTS = ROOT / "bench" / "results"
BENCHMARKS_MD = ROOT / "docs" / "benchmarks.md"


@dataclass(frozen=True)
class Writer:
    module: str
    start: str
    end: str
    result_file: str
    update: Callable[[dict[str, Any], Path], object]


WRITERS = [
    Writer("bench.run", bench_run.DOCS_START, bench_run.DOCS_END, "latest.json",
           bench_run.update_docs),
    Writer("bench.tenk", tenk.DOCS_START, tenk.DOCS_END, "tenk.json", tenk.update_docs),
    Writer("bench.grpc_bench", grpc_bench.MARK_START, grpc_bench.MARK_END, "grpc.json",
           lambda result, path: grpc_bench.update_docs(grpc_bench.markdown(result), path)),
]


@pytest.mark.parametrize("writer", WRITERS, ids=[w.module for w in WRITERS])
def test_bench_scripts_write_their_run_into_docs_benchmarks(writer: Writer, tmp_path: Path
                                                            ) -> None:
    docs = BENCHMARKS_MD.read_text()
    assert 0 <= docs.find(writer.start) < docs.find(writer.end), (
        f"docs/benchmarks.md lacks {writer.start} ... {writer.end}")
    target = tmp_path / "benchmarks.md"
    shutil.copy(BENCHMARKS_MD, target)
    result = json.loads((RESULTS / writer.result_file).read_text())
    writer.update(result, target)
    writer.update(result, target)  # a second run replaces the block, never appends
    text = target.read_text()
    assert text.count(writer.start) == 1 and text.count(writer.end) == 1
    head, end = text.index(writer.start), text.index(writer.end)
    block = text[head + len(writer.start): end]
    assert f"Command: `python -m {writer.module} " in block
    measured_at = result.get("timestamp") or result["measured_at"]
    assert f"Measured {measured_at} on " in block and "CPUs" in block
    assert re.search(r"^\|---", block, re.M), "a markdown table"
    # Everything around the block is left as it was.
    assert text[:head] == docs[:docs.index(writer.start)]
    assert text[end:] == docs[docs.index(writer.end):]


def test_the_readme_carries_no_generated_bench_block() -> None:
    readme = README.read_text()
    for writer in WRITERS:
        assert writer.start not in readme and writer.end not in readme
