"""Tiny Markdown builders, so report code reads as content rather than string plumbing."""

from __future__ import annotations

from collections.abc import Sequence


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """A GitHub-flavoured Markdown table as lines (no rows -> a one-line note instead)."""
    if not rows:
        return ["(nothing to show)"]
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines


def image(alt: str, path: str) -> str:
    return f"![{alt}]({path})"
