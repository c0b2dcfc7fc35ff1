"""Compression on a real 2-node Ray cluster: work spreads over both nodes, and losing a node in the
middle of the job loses and duplicates no slide."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).with_name("two_node_scenarios.py")


def run_scenario(name: str, slides: Path, out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, str(SCRIPT), name, str(slides), str(out)], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture()
def slides(tiny_cohort, tmp_path) -> Path:
    folder = tmp_path / "slides"
    shutil.copytree(tiny_cohort / "slides", folder)
    return folder


def test_compression_spreads_over_both_nodes(slides, tmp_path):
    result = run_scenario("spread", slides, tmp_path / "grids")
    assert result["nodes"] == 2
    assert result["code"] == 0
    assert result["actor_nodes"] == 2, result
    assert result["rows"] == result["unique_ids"] == 8
    assert result["statuses"] == ["ok"] * 8 and result["tiles_match"]


def test_a_node_removed_mid_job_loses_and_duplicates_nothing(slides, tmp_path):
    result = run_scenario("remove-node", slides, tmp_path / "grids")
    assert result["removed_while_encoding"], result
    assert result["finished"] and result["code"] == 0, result
    assert result["rows"] == result["unique_ids"] == 8
    assert result["statuses"] == ["ok"] * 8, result
    assert result["tiles_match"], "each slide's grid holds exactly its tiles, none twice"
    # compress_run.json keeps both passes' stats: the first pass over all 8 slides at the top level,
    # and under "retry" the one extra pass over just the slides whose tiles were lost with the node.
    assert result["first_pass_slides"] == 8, result
    assert result["first_pass_tiles"] <= result["total_tiles"], "a tile counted twice in the first pass"
    if result["retry_slides"]:
        assert result["retry_slides"] <= 8 and result["retry_nested"] is None, result
        assert 0 < result["retry_tiles"] <= result["total_tiles"], result
        # every tile was encoded in one pass or the other
        assert result["first_pass_tiles"] + result["retry_tiles"] >= result["total_tiles"], result
    else:  # Ray Data's own retries saved every slide: the first pass encoded each tile exactly once
        assert result["first_pass_tiles"] == result["total_tiles"], result
