"""Rewriting a generated block of README.md: the text between two HTML-comment markers."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def replace_block(start_marker: str, end_marker: str, block: str, path: Path = README) -> bool:
    """Put ``block`` between the markers (kept); False if the file lacks them, in order."""
    text = path.read_text() if path.exists() else ""
    start, end = text.find(start_marker), text.find(end_marker)
    if start < 0 or end < start:
        return False
    head = text[: start + len(start_marker)]
    path.write_text(f"{head}\n{block}\n{text[end:]}")
    return True
