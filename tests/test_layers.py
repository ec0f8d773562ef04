"""The package import rule of docs/architecture.md, enforced over router/ with ast.

Every top-level package of ``router`` has a rank. A module may import its own package and
packages of a lower rank, never one of the same or a higher rank; ``core``, ``protocol`` and
``balance`` (pure code) never import asyncio. So ``frontdoor`` and ``control`` (same rank) never
import each other. A new package fails this test until it is given a rank. Imports inside
functions count too (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROUTER = Path(__file__).resolve().parent.parent / "router"

RANKS: dict[str, int] = {
    "core": 0,  # errors, clock, config: imported by everything
    "protocol": 1,  # sans-IO codecs and state machines
    "balance": 1,  # pure policies
    "tls": 1,  # TLS contexts from the config, their reload, client identities
    "upstream": 2,  # what a backend lends capacity through: frame pool, gRPC channels
    "dispatch": 3,  # requests, queue, the scheduler, per-backend runtime state
    "health": 4,  # probes and ejection, acting on dispatch's backends
    "lifecycle": 4,  # serving / draining / abandoned, in-flight accounting
    "frontdoor": 5,  # where clients connect
    "control": 5,  # registry, spawner, admin API, metrics exposition
    "client": 5,  # clients of the frame protocol
    "app": 6,  # the composition root
    "cli": 7,  # entry point
    "__main__": 8,
    "__init__": 1,  # the package marker: installs core/build.py's finder, imports core only
}
PURE = {"core", "protocol", "balance", "tls"}

MODULES = sorted(ROUTER.rglob("*.py"))


def _package(path: Path) -> str:
    """The top-level package (or root module) of ``router`` that ``path`` belongs to."""
    parts = path.relative_to(ROUTER).parts
    return parts[0] if len(parts) > 1 else path.stem


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, fully qualified name) of every import in the module, at any depth."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package_parts = ("router", *path.relative_to(ROUTER).parent.parts)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x / from ..x import y
                base_parts = package_parts[: len(package_parts) - node.level + 1]
                base = ".".join(base_parts) + (f".{node.module}" if node.module else "")
            else:
                base = node.module or ""
            found.append((node.lineno, base))
            found.extend((node.lineno, f"{base}.{alias.name}") for alias in node.names)
    return found


def _router_packages_imported(path: Path) -> set[tuple[int, str]]:
    deps: set[tuple[int, str]] = set()
    for line, name in _imports(path):
        parts = name.split(".")
        if parts[0] != "router":
            continue
        deps.add((line, parts[1] if len(parts) > 1 else "__init__"))
    return deps


def _name(path: Path) -> str:
    return str(path.relative_to(ROUTER.parent))


def test_every_package_has_a_rank() -> None:
    unranked = sorted({_package(p) for p in MODULES} - set(RANKS))
    assert not unranked, f"give these packages a rank in docs/architecture.md and here: {unranked}"


def test_the_table_names_no_missing_package() -> None:
    assert sorted(set(RANKS) - {_package(p) for p in MODULES}) == []


def _violations(own: str, deps: set[tuple[int, str]], where: str) -> list[str]:
    rank = RANKS[own]
    bad = [
        f"{where}:{line} ({own}, rank {rank}) imports router.{dep} (rank {RANKS[dep]})"
        for line, dep in deps
        if dep not in (own, "__init__") and dep in RANKS and RANKS[dep] >= rank
    ]
    unknown = [f"{where}:{line} imports unranked router.{dep}" for line, dep in deps
               if dep not in RANKS]
    return sorted(bad + unknown)


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_imports_only_lower_ranked_packages(path: Path) -> None:
    problems = _violations(_package(path), _router_packages_imported(path), _name(path))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", [p for p in MODULES if _package(p) in PURE], ids=_name)
def test_pure_packages_do_not_import_asyncio(path: Path) -> None:
    offending = [
        f"{_name(path)}:{line} imports {name}"
        for line, name in _imports(path)
        if name == "asyncio" or name.startswith("asyncio.")
    ]
    assert not offending, "\n".join(offending)


# -- the checker itself -------------------------------------------------------------------------


def test_checker_sees_lazy_imports() -> None:
    # cli imports router.app inside a function.
    deps = {dep for _, dep in _router_packages_imported(ROUTER / "cli.py")}
    assert {"app", "core", "client"} <= deps


def test_checker_flags_sideways_upward_and_unranked_imports() -> None:
    deps = {(1, "control"), (2, "app"), (3, "core"), (4, "frontdoor"), (5, "nowhere")}
    problems = _violations("frontdoor", deps, "x.py")
    assert [p.split(" ")[0] for p in problems] == ["x.py:1", "x.py:2", "x.py:5"]
