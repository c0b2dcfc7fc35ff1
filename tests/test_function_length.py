"""No function in platform/nic is longer than 100 lines (issue 17).

A function that long does several things without naming them: past this size the steps of a
stage or a training loop are split into named functions (or a small class with one method per
step) whose docstrings say why each step exists. Counted as the AST counts it, from the `def`
line to the last line of the body (decorators and the lines after it not included), for
functions and methods at any depth.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "nic"
MAX_LINES = 100


def long_functions(root: Path = PACKAGE, limit: int = MAX_LINES) -> list[str]:
    """'path:line name (N lines)' for every function or method under `root` longer than `limit`."""
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > limit:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_in_the_package_is_longer_than_100_lines() -> None:
    assert PACKAGE.is_dir(), PACKAGE
    too_long = long_functions()
    assert not too_long, (
        f"functions longer than {MAX_LINES} lines (split them into named steps):\n  " + "\n  ".join(too_long)
    )


def test_the_check_finds_a_long_function(tmp_path: Path) -> None:
    """The walk sees nested functions and methods too, so the test above cannot pass vacuously."""
    body = "\n".join(f"        x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "mod.py").write_text(f"class A:\n    def long(self):\n{body}\n\n    def short(self):\n        pass\n")
    assert long_functions(tmp_path) == [f"{tmp_path.name}/mod.py:2 long ({MAX_LINES + 1} lines)"]
