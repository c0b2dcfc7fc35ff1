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


def test_oracle_ceilings_score_the_hidden_truth_against_the_labels(tmp_path):
    """A label that is a monotone copy of the true rate has Spearman 1; noise lowers the ceiling; the
    survival ceiling ranks the true linear predictor against (time, event)."""
    import numpy as np

    from nic.report.oracle import oracle_ceilings
    from nic.report.study import oracle_lines

    rng = np.random.default_rng(0)
    z = rng.standard_normal(60)
    lp = rng.standard_normal(60)
    times = np.exp(-lp + 0.1 * rng.standard_normal(60))

    def truth(noise: float) -> dict:
        return {"slides": [{"targets": {"proliferation": float(z[i] + noise * rng.standard_normal()),
                                        "growth_pattern": i % 2, "time": float(times[i]), "event": 1,
                                        "linear_predictor": float(lp[i])},
                            "covariates": {"proliferation": float(z[i])},
                            "realised": {"mitoses_per_mm2_tumour": float(np.exp(z[i]))}} for i in range(60)]}

    (tmp_path / "exact.json").write_text(json.dumps(truth(0.0)))
    (tmp_path / "noisy.json").write_text(json.dumps(truth(1.0)))
    exact, noisy = oracle_ceilings(tmp_path / "exact.json", 100), oracle_ceilings(tmp_path / "noisy.json", 100)
    assert exact["proliferation"]["value"] == 1.0
    assert exact["proliferation (mitosis count)"]["value"] == 1.0
    assert 0.3 < noisy["proliferation"]["value"] < 0.9
    assert noisy["proliferation"]["ci_low"] < noisy["proliferation"]["value"] < noisy["proliferation"]["ci_high"]
    assert exact["survival"]["value"] > 0.85 and exact["growth_pattern"]["value"] == 1.0
    text = "\n".join(oracle_lines(tmp_path / "noisy.json"))
    assert "Oracle ceilings" in text and "true log mitotic rate" in text
    assert oracle_ceilings(tmp_path / "missing.json") == {}
