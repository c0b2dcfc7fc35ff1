"""`nic synth` end to end on the shared Ray instance: files, formats, labels, determinism, resume."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import h5py
import numpy as np
import openslide
import pytest
import yaml
from PIL import Image

from nic.cli.main import main
from nic.synth.tiff_writer import pyramid_dimensions

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TINY = ["--slides", "3", "--size", "1100", "--min-size", "800",
        "--set", "patches.train=24", "--set", "patches.val=12", "--set", "patches.chunk_canvases=1",
        "--set", "artefacts.pen=0.5", "--set", "artefacts.blur=0.5"]


def run(out: Path, *extra: str) -> int:
    return main(["synth", "--out", str(out), *TINY, *extra])


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_digests(root: Path) -> dict[str, str]:
    """Every output file but those that legitimately differ: run times, the output path, the run's log (synth.log)."""
    def varies(p: Path) -> bool:
        return (p.name in ("cohort.json", "config.yaml", "synth.log")
                or (p.parent.name == "slides" and p.suffix == ".json"))

    return {str(p.relative_to(root)): digest(p) for p in sorted(root.rglob("*")) if p.is_file() and not varies(p)}


@pytest.fixture(scope="module")
def cohort(ray_session, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "cohort"
    assert run(out, "--seed", "3") == 0
    return out


def read_labels(cohort: Path) -> list[dict]:
    with open(cohort / "labels.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_every_slide_opens_with_openslide_at_the_right_size_levels_and_mpp(cohort):
    rows = read_labels(cohort)
    assert len(rows) == 3
    for row in rows:
        slide = openslide.OpenSlide(str(cohort / row["path"]))
        width, height = int(row["width"]), int(row["height"])
        assert slide.dimensions == (width, height)
        assert 800 <= width <= 1100
        assert list(slide.level_dimensions) == pyramid_dimensions(width, height)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)
        thumb = np.asarray(slide.get_thumbnail((256, 256)).convert("RGB"))
        assert thumb.min() < 200 and np.median(thumb) > 200  # stained tissue on bright glass
        slide.close()
    manifest = json.loads((cohort / "cohort.json").read_text())
    assert [s["status"] for s in manifest["slides"]] == ["ok"] * 3
    assert all(t["status"] == "ok" for t in manifest["patch_tasks"])


def test_labels_agree_with_truth(cohort):
    truth = json.loads((cohort / "truth.json").read_text())
    rows = {r["slide_id"]: r for r in read_labels(cohort)}
    surv = truth["survival"]
    beta = surv["coefficients"]
    patients = {p["patient_id"]: p for p in truth["patients"]}
    noise_sd = truth["proliferation"]["proliferation_noise_sd"]
    assert truth["seed"] == 3 and truth["generator_version"]
    for entry in truth["slides"]:
        params, row = entry["params"], rows[entry["params"]["slide_id"]]
        p = patients[params["patient_id"]]
        assert row["patient_id"] == params["patient_id"]
        x = {
            "proliferation": p["log_mitotic_z"],
            "desmoplastic": 1.0 if p["growth_pattern"] == "desmoplastic" else 0.0,
            "til": (p["til_density"] - 0.4) / 0.2,
            "necrosis": (p["necrosis_fraction"] - 0.16) / (0.28 / math.sqrt(12)),
        }
        lp = sum(beta[k] * x[k] for k in beta)
        t_event = surv["scale_months"] * (-math.log(p["event_u"]) / math.exp(lp)) ** (1 / surv["shape"])
        censor = min(surv["follow_up_months"], p["dropout_months"])
        assert int(row["event"]) == int(t_event <= censor)
        assert float(row["time"]) == pytest.approx(min(t_event, censor), abs=1e-3)
        assert float(row["proliferation"]) == pytest.approx(p["log_mitotic_z"] + noise_sd * p["proliferation_noise"],
                                                            abs=1e-5)
        assert int(row["growth_pattern"]) == int(x["desmoplastic"])
        assert row["growth_pattern_name"] == params["growth_pattern"] == p["growth_pattern"]
        assert entry["realised"]["nuclei"]["tumour"] > 0


def test_tasks_yaml_schema_and_datasets_load(cohort):
    spec = yaml.safe_load((cohort / "tasks.yaml").read_text())
    assert list(spec) == ["tasks"]
    tasks = {t["name"]: t for t in spec["tasks"]}
    assert set(tasks) == {"tissue_type", "tumour", "mitosis", "lymphocyte_density"}
    allowed = {"name", "kind", "classes", "format", "path", "val_path", "weight"}
    for t in tasks.values():
        assert set(t) <= allowed and {"name", "kind", "format", "path", "weight"} <= set(t)
        assert t["kind"] in ("multiclass", "binary", "regression")
        assert t["format"] in ("folder", "hdf5", "manifest")
        assert ("classes" in t) == (t["kind"] != "regression")
    assert {t["format"] for t in tasks.values()} == {"folder", "hdf5", "manifest"}

    for name in ("tissue_type", "mitosis"):
        t = tasks[name]
        for key, n in (("path", 24), ("val_path", 12)):
            root = cohort / t[key]
            files = sorted(root.rglob("*.png"))
            assert len(files) == n
            assert {f.parent.name for f in files} <= set(t["classes"])
            assert Image.open(files[0]).size == (128, 128) and Image.open(files[0]).mode == "RGB"
    tt = cohort / tasks["tissue_type"]["path"]
    assert all(any((tt / c).glob("*.png")) for c in tasks["tissue_type"]["classes"])
    assert any((cohort / tasks["mitosis"]["path"] / "present").glob("*.png"))

    for key, n in (("path", 24), ("val_path", 12)):
        with h5py.File(cohort / tasks["tumour"][key], "r") as f:
            assert f["x"].shape == (n, 128, 128, 3) and f["x"].dtype == np.uint8
            assert f["y"].shape == (n, 1, 1, 1) and f["y"].dtype == np.uint8
            assert set(np.unique(f["y"][:])) <= {0, 1}

    for key, n in (("path", 24), ("val_path", 12)):
        manifest = cohort / tasks["lymphocyte_density"][key]
        with open(manifest, newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == n and list(rows[0]) == ["path", "label"]
        for r in rows:
            assert (manifest.parent / r["path"]).exists()
            assert float(r["label"]) >= 0


def test_same_seed_is_byte_identical_and_other_seed_differs(cohort, tmp_path):
    again = tmp_path / "again"
    assert run(again, "--seed", "3") == 0
    a, b = tree_digests(cohort), tree_digests(again)
    assert any(k.startswith("slides/") and k.endswith(".tiff") for k in a)
    assert any(k.startswith("patches/") for k in a)
    assert a == b
    other = tmp_path / "other"
    assert run(other, "--seed", "4", "--set", "patches.tasks=[]") == 0
    assert digest(other / "slides/S0000.tiff") != digest(cohort / "slides/S0000.tiff")
    assert digest(other / "labels.csv") != digest(cohort / "labels.csv")


def test_rerun_skips_complete_slides_and_redoes_a_damaged_one(cohort, capsys):
    slides = sorted((cohort / "slides").glob("*.tiff"))
    before = {p.name: (p.stat().st_mtime_ns, digest(p)) for p in slides}
    damaged = slides[1]
    damaged.write_bytes(damaged.read_bytes()[:-100])  # truncated: the sidecar's size/hash no longer match
    assert run(cohort, "--seed", "3") == 0
    manifest = json.loads((cohort / "cohort.json").read_text())
    status = {s["slide_id"]: s["status"] for s in manifest["slides"]}
    assert status[damaged.stem] == "ok"
    assert [v for k, v in status.items() if k != damaged.stem] == ["skipped", "skipped"]
    assert all(t["status"] == "skipped" for t in manifest["patch_tasks"])
    for p in slides:
        if p != damaged:
            assert p.stat().st_mtime_ns == before[p.name][0]
        assert digest(p) == before[p.name][1]
    assert not list(cohort.rglob("*.tmp"))


def test_quarter_micron_cohort(ray_session, tmp_path):
    out = tmp_path / "q"
    assert main(["synth", "--out", str(out), "--slides", "1", "--size", "1200", "--mpp", "0.25", "--seed", "1",
                 "--set", "patches.tasks=[]"]) == 0
    slide = openslide.OpenSlide(str(out / "slides" / "S0000.tiff"))
    assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.25)
    assert slide.level_count == 2
    assert yaml.safe_load((out / "tasks.yaml").read_text()) == {"tasks": []}


def test_bad_config_is_a_clear_error(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "x"), "--set", "signal.snr=3"]) == 2
    assert "signal.snr" in capsys.readouterr().err
