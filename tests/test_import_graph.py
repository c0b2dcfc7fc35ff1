"""No import cycle in platform/nic, and the layering of docs/architecture.md, read from the source
(tests/import_graph.py: ast only, nothing is imported, no Ray)."""

from __future__ import annotations

from import_graph import LAYERS, cycles, edges, group, unit, violations

GRAPH = edges()

#: Cycles that close only through imports inside functions (each is one package importing its own
#: modules lazily, both ways): they work, since a function runs after every module is loaded, but
#: they are known debts, not a pattern to copy. This list may only shrink: a new cycle fails the
#: test, and so does a listed one that is gone (remove it here and in docs/architecture.md).
KNOWN_FUNCTION_LEVEL_CYCLES = {
    # load_encoder -> external.load_external/resolve_encoder; external -> artifact.EncoderInfo, BUILTIN_NAMES
    frozenset({"nic.encoders.artifact", "nic.encoders.external"}),
    # read_patches dispatches dense tasks to dense_readers, which reuses readers' helpers
    frozenset({"nic.patches.readers", "nic.patches.dense_readers"}),
}

#: Imports against the layering rules today (docs/architecture.md, "Layers"); may only shrink.
KNOWN_LAYER_VIOLATIONS = {
    # after a search, Ray Train controllers' placement groups left by trials ASHA stopped
    ("nic.tune.stage", "nic.train.trainer"),
}


def _show(component: frozenset[str], kinds: tuple[str, ...]) -> str:
    inner = [e for e in GRAPH if e.source in component and e.target in component and e.kind in kinds]
    return "; ".join(f"{e.source}:{e.line} -> {e.target} ({e.kind}-level)" for e in inner)


def test_the_graph_is_read():
    """Sanity of the reader: known imports of both kinds are found, relative ones resolved."""
    pairs = {(e.source, e.target, e.kind) for e in GRAPH}
    assert ("nic.stage_io", "nic.storage", "module") in pairs
    assert ("nic.config.base", "nic.storage", "module") in pairs
    assert ("nic.cli.main", "nic.pipeline", "function") in pairs  # _check_sections
    assert ("nic.locks", "nic.storage", "function") in pairs
    assert ("nic.encoders", "nic.encoders.artifact", "module") in pairs  # a package's __init__


def test_no_cycle_through_module_level_imports():
    found = cycles(GRAPH, ("module",))
    assert not found, "import cycles: " + " | ".join(_show(c, ("module",)) for c in found)


def test_function_level_imports_close_no_new_cycle():
    found = set(cycles(GRAPH, ("module", "function")))
    new = found - KNOWN_FUNCTION_LEVEL_CYCLES
    assert not new, "new import cycle(s): " + " | ".join(_show(c, ("module", "function")) for c in new)
    gone = KNOWN_FUNCTION_LEVEL_CYCLES - found
    assert not gone, f"no longer a cycle, remove from KNOWN_FUNCTION_LEVEL_CYCLES: {[sorted(c) for c in gone]}"


def test_storage_and_artifacts_import_nothing_else_of_nic():
    """The bottom layer: config imports storage (URIs in path fields, YAML from a bucket), so
    storage must not import config back (it did through its stage decorator, now nic.stage_io).
    Only nic.logs lies below them (storage logs its uploads), and it imports nothing of nic."""
    for module in ("nic.storage", "nic.artifacts"):
        assert [e for e in GRAPH if e.source == module and e.target != "nic.logs"] == [], module
    assert [e for e in GRAPH if e.source == "nic.logs"] == []


def test_config_imports_only_the_bottom_layer():
    bad = [e for e in GRAPH if unit(e.source) == "nic.config" and group(e.target) not in ("config", "base")]
    assert not bad, bad


def test_every_module_is_in_a_layer():
    for module in {e.source for e in GRAPH} | {e.target for e in GRAPH}:
        assert group(module) in LAYERS, module


def test_imports_keep_to_the_layers():
    found = {(e.source, e.target) for e in violations(GRAPH)}
    new = found - KNOWN_LAYER_VIOLATIONS
    assert not new, "imports against the layering of docs/architecture.md: " + ", ".join(
        f"{e.source}:{e.line} -> {e.target} ({group(e.source)} -> {group(e.target)})"
        for e in violations(GRAPH) if (e.source, e.target) in new)
    gone = KNOWN_LAYER_VIOLATIONS - found
    assert not gone, f"no longer a violation, remove from KNOWN_LAYER_VIOLATIONS: {sorted(gone)}"
