"""Assemble benchmarks/RESULTS.md from the per-area results each benchmark script writes."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["reader", "synth", "encoders", "compress", "downstream"]

HEADER = """# Benchmark results

Each section is written by its script in `benchmarks/` (`make bench` runs them all; each records
the machine it ran on). This machine is shared and noisy, so every goal is a ratio measured within
one run, never a time compared across runs. Sections are assembled by `benchmarks/collect_results.py`.
"""


def replace_section(path: Path, start: str, end: str, table: str, title: str) -> None:
    """Put `table` (which begins with `start` and ends with `end`) into the results file `path` in
    place of the section between those markers, or at its end; a new file starts with `title`.
    What else the file holds (notes written by hand, other scripts' sections) is kept."""
    text = path.read_text() if path.exists() else f"{title}\n\n"
    if start in text and end in text:
        text = text[: text.index(start)] + table + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + table + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main() -> None:
    parts = [HEADER]
    results = HERE / "results"
    names = [n for n in ORDER if (results / f"{n}.md").exists()]
    names += sorted(p.stem for p in results.glob("*.md") if p.stem not in ORDER)
    for name in names:
        text = (results / f"{name}.md").read_text().strip()
        lines = text.splitlines()
        if lines and lines[0].startswith("# "):  # demote each file's title to a section
            lines[0] = "#" + lines[0]
        parts.append("\n".join(lines))
    (HERE / "RESULTS.md").write_text("\n\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
