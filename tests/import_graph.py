"""The import graph of platform/nic from its source (ast, nothing imported), for
tests/test_import_graph.py and docs/architecture.md. `python tests/import_graph.py` prints the
imports between subpackages, every cycle, and the imports that break the layering rules.

An edge is an `import nic...` / `from nic... import` (or a relative import) in a module of nic,
to the module it names: `from nic.a import b` is an edge to nic.a.b when that is a module, else
to nic.a (its __init__). Imports under `if TYPE_CHECKING:` never run and are left out. Each edge
is "module" (runs when the module is imported: top level, class bodies) or "function" (runs
when the function does). The parent packages an import also runs (nic.a/__init__ for nic.a.b)
are not edges: Python runs a package's __init__ before its submodules, so they make no cycle.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "platform"

#: The layers of nic, lowest first: top-level packages or modules of nic, by group.
LAYERS: dict[str, tuple[str, ...]] = {
    "logging": ("nic.logs",),
    "base": ("nic", "nic.storage", "nic.artifacts"),
    "config": ("nic.config",),
    "plumbing": ("nic.locks", "nic.runtime", "nic.stage_io"),
    "library": ("nic.slides", "nic.grids", "nic.encoders", "nic.downstream", "nic.patches"),
    "stages": ("nic.tiling", "nic.synth", "nic.compress", "nic.train", "nic.tune", "nic.report", "nic.pipeline"),
    "entry": ("nic.cli",),
}
#: What each group may import besides itself ("self": only its own package for stages and base).
MAY_IMPORT: dict[str, tuple[str, ...]] = {
    "logging": (),
    "base": ("logging",),
    "config": ("logging", "base"),
    "plumbing": ("logging", "base", "config"),
    "library": ("logging", "base", "config"),
    "stages": ("logging", "base", "config", "plumbing", "library"),
    "entry": ("logging", "base", "config", "plumbing", "library", "stages"),
}
#: Stage packages that run other stages: the modules of other stage packages each may import.
ORCHESTRATES: dict[str, tuple[str, ...]] = {
    "nic.pipeline": ("nic.report.study",),  # and every stage by name (importlib), no import statement
    "nic.tune": ("nic.compress.stage", "nic.train.encoder_stage", "nic.train.downstream_stage"),
}


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    kind: str  # "module" or "function"
    line: int


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file of every module of nic (a package is its __init__)."""
    found = {}
    for path in sorted((root / "nic").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in known:
            return ".".join(parts[:end])
    return None


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def edges(root: Path = ROOT) -> list[Edge]:
    known = modules(root)
    found: list[Edge] = []
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]

        def visit(node: ast.AST, in_function: bool, source: str = name, package: str = package) -> None:
            for child in ast.iter_child_nodes(node):
                if _is_type_checking(child):
                    continue
                kind = "function" if in_function else "module"
                targets: list[str] = []
                if isinstance(child, ast.Import):
                    targets = [a.name for a in child.names if a.name.split(".")[0] == "nic"]
                elif isinstance(child, ast.ImportFrom):
                    if child.level:
                        base = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                        full = ".".join(base + ([child.module] if child.module else []))
                    else:
                        full = child.module or ""
                    if full.split(".")[0] == "nic":
                        targets = [f"{full}.{a.name}" if f"{full}.{a.name}" in known else full for a in child.names]
                for target in targets:
                    resolved = _resolve(target, known)
                    if resolved is not None and resolved != source:
                        found.append(Edge(source, resolved, kind, child.lineno))
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

        visit(ast.parse(path.read_text(), filename=str(path)), False)
    return sorted(set(found), key=lambda e: (e.source, e.target, e.line))


def cycles(graph_edges: list[Edge], kinds: tuple[str, ...] = ("module",)) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (each holds at least one cycle)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for edge in graph_edges:
        if edge.kind in kinds:
            graph[edge.source].add(edge.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def connect(node: str) -> None:  # Tarjan
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.add(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(found, key=sorted)


def unit(module: str) -> str:
    """The top-level package or module of nic a module belongs to (nic.train.common -> nic.train)."""
    parts = module.split(".")
    return ".".join(parts[:2])


def group(module: str) -> str:
    for name, units in LAYERS.items():
        if unit(module) in units:
            return name
    raise KeyError(f"{module}: in no layer of tests/import_graph.py LAYERS: add it there")


def allowed(edge: Edge) -> bool:
    """Whether an import keeps to the layering rules (docs/architecture.md, "Layers")."""
    source, target = group(edge.source), group(edge.target)
    if source == "entry":
        return True
    if unit(edge.source) == unit(edge.target):  # within one package (or module)
        return True
    if source == target:
        # other packages of the same group: library packages may use each other (acyclic, tested);
        # plumbing may use plumbing; config is one package; base modules and stages stand alone,
        # except the orchestrators, which run other stages through their entry modules.
        if source in ("library", "plumbing"):
            return True
        return source == "stages" and edge.target in ORCHESTRATES.get(unit(edge.source), ())
    return target in MAY_IMPORT[source]


def violations(graph_edges: list[Edge]) -> list[Edge]:
    return [e for e in graph_edges if not allowed(e)]


def _report() -> None:
    graph = edges()
    by_unit: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for edge in graph:
        if unit(edge.source) != unit(edge.target):
            by_unit[(unit(edge.source), unit(edge.target))][edge.kind] += 1
    print("imports between top-level packages (module-level / function-level import statements):")
    for (source, target), counts in sorted(by_unit.items()):
        print(f"  {source:16s} -> {target:16s} {counts.get('module', 0):3d} / {counts.get('function', 0):3d}")
    for kinds in (("module",), ("module", "function")):
        found = cycles(graph, kinds)
        print(f"cycles through {' and '.join(kinds)}-level imports: {len(found)}")
        for component in found:
            inner = [e for e in graph if e.source in component and e.target in component and e.kind in kinds]
            print("  " + ", ".join(f"{e.source} -> {e.target} ({e.kind}, line {e.line})" for e in inner))
    bad = violations(graph)
    print(f"imports against the layering rules: {len(bad)}")
    for edge in bad:
        print(f"  {edge.source}:{edge.line} -> {edge.target} ({edge.kind}-level; "
              f"{group(edge.source)} -> {group(edge.target)})")


if __name__ == "__main__":
    sys.exit(_report())
