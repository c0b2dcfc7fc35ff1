"""Start-up cost of the `nic` command (issue 16 item 1): what `nic --help` and `nic <stage> --help`
import, that the lazily built parser still has every flag, and the lazy parts of nic.grids and
nic.runtime. Each import check runs in a fresh interpreter, since this one has imported everything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nic.cli.main import STAGES, build_parser, requested_command

REPO = Path(__file__).resolve().parent.parent

#: Modules a help path must not import: seconds each (torch, ray) or half a second together.
HEAVY = ("torch", "ray", "ray.data", "pyarrow", "pandas", "numpy", "matplotlib", "scipy", "openslide")


def _modules_after(code: str) -> set[str]:
    """sys.modules of a fresh interpreter after running `code` (stdout of `code` is discarded)."""
    script = (
        "import contextlib, io, json, sys\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        + "".join(f"    {line}\n" for line in code.splitlines())
        + "print(json.dumps(sorted(sys.modules)))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "platform"),
                                                                       os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def _help(argv: list[str]) -> str:
    return ("import nic.cli.main as m\n"
            "try:\n"
            f"    m.main({argv!r})\n"
            "except SystemExit:\n"
            "    pass")


def test_top_level_help_imports_neither_torch_nor_ray_nor_any_config():
    modules = _modules_after(_help(["--help"]))
    assert "nic.cli.main" in modules  # the help really ran
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))
    assert not {m for m in modules if m.startswith("nic.config")}, "no config model is needed to list stages"


@pytest.mark.parametrize("stage", ["tile", "compress"])
def test_stage_help_imports_only_its_own_config(stage):
    modules = _modules_after(_help([stage, "--help"]))
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))
    own = next(s.config.split(":")[0] for s in STAGES if s.name == stage)
    others = {s.config.split(":")[0] for s in STAGES if s.name != stage}
    assert own in modules
    assert not modules & others, sorted(modules & others)


def test_grids_help_imports_no_grid_reader():
    """`nic grids` registers its commands from nic.grids.cli; the package must not pull in the
    readers (pandas, pyarrow) with it."""
    modules = _modules_after(_help(["grids", "--help"]))
    assert "nic.grids.cli" in modules
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))


def test_grids_package_names_are_there_on_first_use():
    modules = _modules_after("import nic.grids")
    assert "nic.grids.reader" not in modules and "pyarrow" not in modules

    import nic.grids as grids
    from nic.grids.reader import load_grid
    from nic.grids.schema import GridError

    assert grids.load_grid is load_grid and grids.GridError is GridError
    assert set(grids.__all__) == set(grids._EXPORTS) and set(grids.__all__) <= set(dir(grids))
    for name in grids.__all__:
        assert getattr(grids, name) is not None
    with pytest.raises(AttributeError, match="no_such_name"):
        grids.no_such_name  # noqa: B018


def _options(parser, command: str) -> dict[str, str | None]:
    """Every option of `command`'s subparser with its help text."""
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {opt: action.help for action in sub._actions for opt in action.option_strings}


@pytest.mark.parametrize("stage", [s.name for s in STAGES])
def test_the_parser_built_for_one_stage_has_all_its_flags(stage):
    """Building only the requested stage's flags must not lose one: the same options and help as
    the parser with every stage (whose flags tests/test_cli.py checks against the config models)."""
    full = _options(build_parser(), stage)
    assert len(full) > 6  # the model's own flags are there, not only the common ones
    assert _options(build_parser([stage, "--help"]), stage) == full


def test_one_stage_parser_parses_what_the_full_one_does(tmp_path):
    argv = ["tile", "--slides", "a.svs", "--out", str(tmp_path), "--strict", "--set", "slide.tile_px=64"]
    assert vars(build_parser(argv).parse_args(argv)) == vars(build_parser().parse_args(argv))
    grids = ["grids", "ls", "--grids", str(tmp_path)]
    assert build_parser(grids).parse_args(grids).grids == tmp_path


@pytest.mark.parametrize(("argv", "command"), [
    ([], None), (["--help"], None), (["-h"], None), (["tile"], "tile"),
    (["compress", "--slides", "tile"], "compress"), (["grids", "ls"], "grids"),
])
def test_requested_command_is_the_first_word(argv, command):
    assert requested_command(argv) == command
