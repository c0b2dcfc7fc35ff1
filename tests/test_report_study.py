"""The study report's slide-level section from metrics.json files alone (no training): the CNN
table, the linear probe beside it, and the comparison figure."""

from __future__ import annotations

import json
from types import SimpleNamespace

from PIL import Image

from nic.report.study import PROBE_NOTE, downstream_section


def _entry(value: float, low: float, high: float) -> dict:
    return {"value": value, "ci_low": low, "ci_high": high, "n": 30}


def _metrics(cnn: float, probe: dict | None) -> dict:
    out = {"primary_metric": "roc_auc", "cv": {"metrics": {"roc_auc": _entry(cnn, cnn - 0.1, cnn + 0.05)}, "slides": 30}}
    if probe is not None:
        out["probe"] = probe
    return out


def test_probe_table_and_markers_beside_the_cnn(tmp_path):
    models = {("mtl", "growth"): tmp_path / "mtl", ("mean-rgb", "growth"): tmp_path / "rgb",
              ("raw", "growth"): tmp_path / "raw"}
    ok_probe = {"model": "logistic", "features": "x", "cv": {"metrics": {"roc_auc": _entry(0.91, 0.8, 0.97)}, "slides": 30},
                "test": {"metrics": {"roc_auc": _entry(0.88, 0.7, 0.99)}, "slides": 8}, "seconds": 1.2}
    contents = {"mtl": _metrics(0.8, ok_probe),
                "rgb": _metrics(0.6, {"model": "logistic", "error": "ValueError: one class", "seconds": 0.1}),
                "raw": _metrics(0.55, None)}
    for name, metrics in contents.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(metrics))
    report_dir = tmp_path / "report"
    lines = downstream_section(models, [SimpleNamespace(name="growth")], ["mtl", "mean-rgb", "raw"], report_dir, tmp_path)
    text = "\n".join(lines)
    assert "| mtl | 0.800 [0.70, 0.85] |" in text  # the CNN's table as before
    assert "Linear probe on the same folds:" in text and PROBE_NOTE in text
    assert "| mtl | 0.910 [0.80, 0.97]; test 0.880 [0.70, 0.99] (logistic) |" in text
    assert "| mean-rgb | failed: ValueError: one class |" in text and "| raw | not run |" in text
    with Image.open(report_dir / "comparison.png") as img:
        assert img.format == "PNG"
