"""Each stage's log file (`<out>/<stage>.log`, nic.logs): what it keeps, that a re-run appends,
that the terminal lines stay as they were, that a bucket `out` gets its log uploaded; and that no
bare print is left in platform/nic outside the CLI's own output.

The stage run is `nic tile` on the real fixture, embedded (local worker processes, no Ray): the
cheapest real stage, and the same `stage_storage` path every stage's log goes through.
"""

from __future__ import annotations

import ast
import logging
import shutil
import warnings
from pathlib import Path

import pytest

from nic.cli.main import main
from nic.logs import ROOT, TO_STDOUT, stage_log_file, stage_logger

PLATFORM = Path(__file__).resolve().parent.parent / "platform"


def _file_handlers() -> list[logging.Handler]:
    """The run log handlers left on the `nic` logger (not pytest's own, which it also attaches to
    loggers that do not propagate)."""
    return [h for h in logging.getLogger(ROOT).handlers
            if isinstance(h, logging.FileHandler) and h.baseFilename.endswith(".log")]


def test_tile_keeps_its_log_with_config_progress_and_warnings_and_a_rerun_appends(shared_slides, tmp_path,
                                                                                 capsys):
    out = tmp_path / "tiled"
    args = ["tile", "--slides", str(shared_slides / "small_HE.svs"), str(shared_slides / "unopenable.tiff"),
            "--out", str(out), "--thumbnail-px", "192"]
    assert main(args) == 0
    err = capsys.readouterr().err
    log = (out / "tile.log").read_text()

    # the terminal shows the message alone, as the prints did
    assert "[tile] 2 inputs: 2 to tile, 0 already complete, 0 unusable" in err
    assert "\n[tile] done: 1 ok, 0 skipped (already complete), 1 failed" in "\n" + err
    assert "\n[tile]   failed unopenable: " in "\n" + err
    assert "resolved config" not in err and "INFO" not in err
    # the file: a dated header, the resolved config as YAML, the same lines with time and level
    assert log.count("===== nic tile: run started ") == 1 and "===== nic tile: run ended " in log
    config = log.split("--- resolved config ---\n", 1)[1].split("--- end of config ---", 1)[0]
    assert "thumbnail_px: 192\n" in config and f"out: {out}\n" in config and "tile_px: " in config
    assert " INFO    [tile] 2 inputs: 2 to tile" in log and " INFO    [tile] done: 1 ok" in log
    assert " WARNING [tile]   failed unopenable: " in log
    assert "exit code 0" in log
    assert _file_handlers() == [], "the run's file handler is removed when it ends"

    assert main(args) == 0
    err = capsys.readouterr().err
    again = (out / "tile.log").read_text()
    assert again.startswith(log), "a re-run appends; the first run's log is kept"
    assert again.count("===== nic tile: run started ") == 2
    assert "1 already complete" in again[len(log):] and "1 already complete" in err
    assert _file_handlers() == []


def test_the_log_file_keeps_warnings_debug_lines_with_verbose_and_the_traceback_of_a_failure(tmp_path, capsys):
    class Config:
        verbose = True

        def model_dump(self, mode: str = "python") -> dict:
            return {"out": str(tmp_path), "verbose": True, "seed": 3}

    logger = stage_logger("demo")
    with pytest.raises(RuntimeError, match="boom"):
        with stage_log_file(logger, tmp_path, Config()):
            logger.debug("[demo] a debug line")
            logger.info("[demo] to stdout", extra=TO_STDOUT)
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.warn("a python warning", UserWarning, stacklevel=1)
            raise RuntimeError("boom")
    captured = capsys.readouterr()
    text = (tmp_path / "demo.log").read_text()
    assert "seed: 3\n" in text and "verbose: true\n" in text
    assert " DEBUG   [demo] a debug line" in text and "[demo] a debug line\n" in captured.err
    assert "[demo] to stdout\n" == captured.out
    assert " WARNING " in text and "UserWarning: a python warning" in text
    assert "the run ended with RuntimeError" in text and "raise RuntimeError(\"boom\")" in text
    assert _file_handlers() == []
    logger.debug("[demo] not shown once the verbose run has ended")
    assert capsys.readouterr().err == ""


def test_a_bucket_out_gets_its_log_uploaded_and_a_rerun_appends_to_it(s3_bucket, shared_slides, tmp_path, capsys):
    """The log is written in the local mirror of `out` and uploaded with the other outputs; a run
    on another machine (here: the mirror deleted) fetches it and appends."""
    import pyarrow.fs as pafs

    from nic.storage import mirror_path

    out = f"{s3_bucket}/tiled"
    args = ["tile", "--slides", str(shared_slides / "small_HE.svs"), "--out", out, "--thumbnail-px", "128"]
    assert main(args) == 0
    fs, path = pafs.FileSystem.from_uri(f"{out}/tile.log")

    def remote_log() -> str:
        with fs.open_input_stream(path) as stream:
            return stream.read().decode()

    first = remote_log()
    assert "[tile] done: 1 ok" in first and "exit code 0" in first
    shutil.rmtree(mirror_path(out))
    assert main(args) == 0
    second = remote_log()
    assert second.startswith(first) and second.count("===== nic tile: run started ") == 2
    capsys.readouterr()


#: Modules of platform/nic that may print: the user's own output of a command, not progress or warnings.
PRINT_ALLOWED = {
    "nic/cli/main.py": "the CLI's own output: --print-config's YAML on stdout, and the one-line error "
                       "of a command that ended (bad config, Ctrl-C), after the stage's log is closed",
    "nic/grids/cli.py": "`nic grids show` / `ls` print their result (a path, a table) and their error: "
                        "command output, no stage and no out folder to log into",
    "nic/synth/figures.py": "its `python -m` script prints the paths of the figures it wrote",
}


def test_no_bare_print_outside_the_cli_output():
    found = []
    for path in sorted((PLATFORM / "nic").rglob("*.py")):
        rel = path.relative_to(PLATFORM).as_posix()
        if rel in PRINT_ALLOWED:
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                found.append(f"{rel}:{node.lineno}")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "write" and ast.unparse(node.func.value) in ("sys.stderr", "sys.stdout")):
                found.append(f"{rel}:{node.lineno}")
    assert found == [], f"log through nic.logs (stage_logger) instead of printing: {found}"
    for rel in PRINT_ALLOWED:
        assert (PLATFORM / rel).exists(), f"{rel} is allow-listed but gone: drop it from PRINT_ALLOWED"
