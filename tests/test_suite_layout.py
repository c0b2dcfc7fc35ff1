"""The test suite's own layout: a module named test_*.py holds tests (pytest collects it as one),
and a helper module shared by tests is named without the prefix (compress_support.py,
downstream_helpers.py, ...) and holds none, so none of its functions is skipped unnoticed."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _test_names(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
             and n.name.startswith("test")]
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name.startswith("Test")):
        names += [f"{cls.name}.{n.name}" for n in cls.body
                  if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name.startswith("test")]
    return names


def test_every_test_module_holds_tests():
    empty = [p.name for p in sorted(TESTS.glob("test_*.py")) if not _test_names(p)]
    assert not empty, f"helper modules named like tests (rename them without test_): {empty}"


def test_helper_modules_hold_no_tests():
    helpers = [p for p in sorted(TESTS.glob("*.py")) if not p.name.startswith("test_") and p.name != "conftest.py"]
    assert helpers, "tests/ has helper modules (grid_factory.py, ...)"
    stray = {p.name: _test_names(p) for p in helpers if _test_names(p)}
    assert not stray, f"tests in modules pytest never collects: {stray}"
