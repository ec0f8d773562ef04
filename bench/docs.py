"""Rewriting a generated block of docs/benchmarks.md: the text between two HTML-comment markers.

Each bench script owns one block (``make bench``, ``make bench-10k``, ``make bench-grpc``) and
writes only the run's record into it: the command that reproduces the run, its date, the
machine, and the tables. What the figures mean lives in the hand-written text around the
blocks, so a new run never leaves stale prose behind.
"""

from __future__ import annotations

import shlex
from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def replace_block(
    start_marker: str, end_marker: str, block: str, path: Path = BENCHMARKS_MD
) -> bool:
    """Put ``block`` between the markers (kept); False if the file lacks them, in order."""
    text = path.read_text() if path.exists() else ""
    start, end = text.find(start_marker), text.find(end_marker)
    if start < 0 or end < start:
        return False
    head = text[: start + len(start_marker)]
    path.write_text(f"{head}\n{block}\n{text[end:]}")
    return True


def command_line(module: str, options: list[tuple[str, object]]) -> str:
    """``python -m MODULE --flag value ...``: the command that repeats a run with the settings
    it recorded (every option spelled out, so a changed default does not change its meaning).
    An option whose value is ``True`` is a bare flag; ``None`` or ``False`` leaves it out."""
    words = ["python", "-m", module]
    for flag, value in options:
        if value is None or value is False:
            continue
        words.append(flag)
        if value is not True:
            words.append(",".join(map(str, value)) if isinstance(value, list | tuple)
                         else str(value))
    return shlex.join(words)


def run_header(command: str, measured_at: str, machine: str) -> str:
    """The first lines of every block: how to repeat the run, when and where it ran."""
    return f"Command: `{command}`  \nMeasured {measured_at} on {machine}."
