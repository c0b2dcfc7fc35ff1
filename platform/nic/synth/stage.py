"""`nic synth`: generate a synthetic cohort on Ray, one task per slide and per patch chunk.

Cohort folder:

    slides/S0000.tiff ...   pyramidal tiled-JPEG TIFFs (OpenSlide generic-tiff, mpp in the file)
    slides/S0000.json ...   per-slide sidecar written after its TIFF: spec hash, sha256, statistics
    labels.csv              slide_id, patient_id, path, proliferation, growth_pattern, time, event, ...
    truth.json              every hidden parameter, the hazard model, the generator version and seed
    tasks.yaml              the patch tasks for `nic.patches`
    heldout_tasks.yaml      tasks held out of encoder training (opt-in, e.g. apoptosis), same schema
    patches/...             one dataset per task (folders of PNG, HDF5, CSV manifest)
                            dense tasks (opt-in, nic.synth.dense): nuclei HDF5 with instance and
                            type maps, tissue_regions image/mask PNG pairs
    config.yaml             the resolved config
    cohort.json             written last: what was made, per slide and task status

Deterministic: every slide and patch chunk has its own seed derived from the master seed, so
outputs do not depend on which worker runs what, and the same seed gives byte-identical slides,
labels and patches. Re-running skips slides whose sidecar matches their spec and whose file is
intact, and patch tasks whose sidecar matches.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from nic.artifacts import (
    STATUS_FAILED,
    STATUS_OK,
    STATUS_SKIPPED,
    atomic_path,
    clean_stale_temporaries,
    read_json,
    stable_hash,
    write_bytes_atomic,
    write_json_atomic,
)
from nic.config.identity import config_identity
from nic.config.synth import SynthConfig
from nic.logs import TO_STDOUT, stage_logger
from nic.stage_io import stage_storage
from nic.storage import display, ensure_local, publish, remove, uri_for
from nic.synth.labels import (
    APOPTOTIC_SPREAD,
    NECROSIS_MEAN,
    NECROSIS_SD,
    TIL_MEAN,
    TIL_SD,
    covariates,
    hazard_coefficients,
    plan_cohort,
    targets,
)
from nic.synth.params import CLASSES, GENERATOR_VERSION, SlideParams
from nic.synth.patches import (
    DENSE,
    DETECTIONS,
    HELD_OUT,
    SPLITS,
    TASKS,
    Chunk,
    plan_chunks,
    render_chunk,
    render_detection_chunk,
    write_pngs,
)

SLIDES_DIR = "slides"
PATCHES_DIR = "patches"
HELDOUT_YAML = "heldout_tasks.yaml"
log = stage_logger("synth")
LABEL_COLUMNS = (
    "slide_id", "patient_id", "path", "proliferation", "growth_pattern", "growth_pattern_name",
    "time", "event", "width", "height", "mpp",
)


def spec_hash(obj: Any) -> str:
    """Hash of what determines an output: its parameters and the generator version (a new
    generator draws other pixels from the same parameters)."""
    return stable_hash({"generator": GENERATOR_VERSION, "spec": obj})


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


SPEC_DIGITS = 10
"""Significant digits of the floats in a slide's spec. Its parameters are computed (stain vectors
are normalised, fractions drawn through exp/log), and numpy's SIMD kernels differ in the last bit
between CPUs (AVX-512 or not): hashed in full, a cohort made on one machine would re-render on
another. Ten digits are far above what changes a pixel and far below a last-bit difference."""


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.{SPEC_DIGITS}g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def _slide_spec(params: SlideParams, config: SynthConfig) -> dict:
    """What determines a slide's pixels (its sidecar's `spec` is this hashed): its parameters,
    floats at SPEC_DIGITS, and the tile size and JPEG quality of the file."""
    return {"params": _rounded(params.to_dict()), "tile_size": config.render.tile_size,
            "quality": config.render.quality}


def render_slide(params_dict: dict, out: str, tile_size: int, quality: int, spec: str) -> dict:
    """Render one slide to slides/<id>.tiff, then its sidecar; return the sidecar (Ray task body)."""
    from nic.synth.render import Scene
    from nic.synth.tiff_writer import write_pyramidal_tiff

    start = time.monotonic()
    params = SlideParams.from_dict(params_dict)
    scene = Scene(params)
    path = Path(out) / SLIDES_DIR / f"{params.slide_id}.tiff"
    with atomic_path(path) as tmp:
        dims = write_pyramidal_tiff(
            tmp, params.width, params.height, scene.render, mpp=params.mpp, tile_size=tile_size, quality=quality
        )
    counts = scene.count_nuclei()
    tumour_cells = counts["tumour"] + counts["mitosis"] + counts["apoptotic"]
    fractions = scene.layout.fractions()
    tumour_area_mm2 = fractions["tumour"] * (1 - fractions["background"]) * params.width * params.height * (
        params.mpp / 1000.0
    ) ** 2
    sidecar = {
        "slide_id": params.slide_id,
        "spec": spec,
        "bytes": path.stat().st_size,
        "sha256": file_sha256(path),
        "levels": [list(d) for d in dims],
        "seconds": round(time.monotonic() - start, 3),
        "realised": {
            "class_fractions": {k: round(float(v), 6) for k, v in fractions.items()},
            "nuclei": counts,
            "mitoses_per_mm2_tumour": round(counts["mitosis"] / tumour_area_mm2, 4) if tumour_area_mm2 else 0.0,
            # apoptotic bodies are tumour cells too: the fractions estimate the parameters
            "mitotic_fraction": round(counts["mitosis"] / max(1, tumour_cells), 6),
            "apoptotic_fraction": round(counts["apoptotic"] / max(1, tumour_cells), 6),
        },
    }
    write_json_atomic(path.with_suffix(".json"), sidecar)
    # On an object store, the node that rendered the slide uploads it (the driver cannot see it).
    publish(path)
    publish(path.with_suffix(".json"))
    return sidecar


def render_patch_chunk(config_dict: dict, chunk: Chunk, staging: str) -> dict:
    """Render one chunk of patches; image formats are written here, arrays returned for HDF5."""
    config = SynthConfig.model_validate(config_dict)
    if chunk.task in DENSE:
        return _render_dense_chunk(config, chunk, staging)
    spec = TASKS[chunk.task]
    if chunk.task in HELD_OUT and chunk.task in DETECTIONS:  # the canvas of each tile, for grouped folds
        x, y, canvas = render_detection_chunk(config, chunk)
        return {"x": x, "y": y, "canvas": canvas}
    x, y = render_chunk(config, chunk)
    if spec.format == "hdf5":
        return {"x": x, "y": y}
    folder = Path(staging) / (chunk.split if spec.format == "folder" else "")
    names = write_pngs(folder, chunk.task, chunk.split, chunk.first_patch, x, y)
    publish(folder)  # on an object store: the driver fetches the staged files before moving them
    return {"names": names, "y": y}


def _render_dense_chunk(config: SynthConfig, chunk: Chunk, staging: str) -> dict:
    """Dense chunks: PNG pairs written here (segmentation), arrays returned for HDF5 (nuclei)."""
    from nic.synth.dense import render_dense_chunk, write_pairs

    out = render_dense_chunk(config, chunk)
    if TASKS[chunk.task].format == "hdf5":
        return out
    folder = Path(staging) / chunk.split
    write_pairs(folder, chunk.task, chunk.split, chunk.first_patch, out["x"], out["y"])
    publish(folder)
    return {"stats": out["stats"]}


def _slide_is_complete(out: Path, slide_id: str, spec: str) -> dict | None:
    """The sidecar of a slide if it matches `spec` and its TIFF is intact, else None."""
    tiff = out / SLIDES_DIR / f"{slide_id}.tiff"
    sidecar_path = tiff.with_suffix(".json")
    if not (tiff.exists() and sidecar_path.exists()):
        return None
    try:
        sidecar = read_json(sidecar_path)
    except (OSError, ValueError):
        return None
    if sidecar.get("spec") != spec or sidecar.get("bytes") != tiff.stat().st_size:
        return None
    if sidecar.get("sha256") != file_sha256(tiff):
        return None
    return sidecar


def _patch_spec(config: SynthConfig, task: str) -> str:
    return spec_hash(
        {
            "task": task,
            "seed": config.seed,
            # the patch options but the task list: adding a task must not redo the others
            "patches": {k: v for k, v in config_identity(config.patches).items() if k != "tasks"},
            "signal": config_identity(config.signal),
            "stain_variation": config.render.stain_variation,
        }
    )


def cohort_config_hash(config: SynthConfig) -> str:
    """cohort.json's `config_hash`: every setting that shapes the cohort, with the generator version."""
    return spec_hash(config_identity(config))


def _task_is_complete(out: Path, task: str, spec: str) -> bool:
    sidecar = out / PATCHES_DIR / f"{task}.json"
    if not sidecar.exists():
        return False
    try:
        data = read_json(sidecar)
    except (OSError, ValueError):
        return False
    return data.get("spec") == spec and all((out / p).exists() for p in (TASKS[task].path, TASKS[task].val_path))


def _write_h5(path: Path, x: np.ndarray, y: np.ndarray, canvas: np.ndarray | None = None) -> None:
    """PCam layout: `x` (N, px, px, 3) uint8, `y` (N, 1, 1, 1) uint8, and `canvas` (N,) int32 if
    given (held-out tasks: the canvas of each tile, numbered through the split); no timestamps
    (determinism)."""
    import h5py

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w", libver="earliest") as f:
            f.create_dataset("x", data=x, dtype="uint8", chunks=(min(len(x), 32), *x.shape[1:]) if len(x) else None,
                             compression="gzip", compression_opts=4, track_times=False)
            f.create_dataset("y", data=y.astype(np.uint8).reshape(-1, 1, 1, 1), track_times=False)
            if canvas is not None:
                f.create_dataset("canvas", data=canvas.astype(np.int32), track_times=False)


def _split_canvases(parts: list[dict]) -> np.ndarray:
    """Each chunk's canvas indices, renumbered through the split (chunks in order): one id per canvas."""
    out, offset = [], 0
    for part in parts:
        out.append(part["canvas"].astype(np.int64) + offset)
        offset += int(part["canvas"].max()) + 1 if len(part["canvas"]) else 0
    return np.concatenate(out).astype(np.int32) if out else np.zeros(0, np.int32)


def _csv_text(rows: list[dict], columns: tuple[str, ...] | list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row[k] for k in columns})
    return buf.getvalue()


def _stack(parts: list[dict], key: str, empty: tuple[int, ...]) -> np.ndarray:
    return np.concatenate([p[key] for p in parts]) if parts else np.zeros(empty, np.uint8)


def _finish_dense_task(out: Path, task: str, results: dict[str, list[dict]], spec: str) -> dict:
    """Dense tasks: HDF5 written or staged PNG pairs moved into place, then the sidecar (last),
    which counts nuclei per type or pixels per class."""
    from nic.synth.dense import NUCLEUS_TYPES, REGION_CLASSES, write_dense_h5

    tspec = TASKS[task]
    staging = out / PATCHES_DIR / f".{task}.staging"
    names = NUCLEUS_TYPES if tspec.kind == "nuclei" else REGION_CLASSES
    summary: dict = {"name": task, "spec": spec, "format": tspec.format, "kind": tspec.kind}
    totals = {}
    for split in SPLITS:
        parts = results.get(split, [])
        stats = np.concatenate([p["stats"] for p in parts]) if parts else np.zeros((0, len(names)), np.int64)
        summary[split] = int(len(stats))
        totals[split] = dict(zip(names, stats.sum(0).astype(int).tolist()))
        target = out / (tspec.path if split == "train" else tspec.val_path)
        if tspec.format == "hdf5":
            write_dense_h5(target, _stack(parts, "x", (0, 1, 1, 3)), _stack(parts, "y", (0, 1, 1)),
                           _stack(parts, "types", (0, 1, 1)))
        else:
            source = staging / split
            (source / "images").mkdir(parents=True, exist_ok=True)
            (source / "masks").mkdir(parents=True, exist_ok=True)
            if target.exists():
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
    if staging.exists():
        shutil.rmtree(staging)
    summary["nuclei_by_type" if tspec.kind == "nuclei" else "class_pixels"] = totals
    write_json_atomic(out / PATCHES_DIR / f"{task}.json", summary)
    return summary


def _finish_patch_task(out: Path, task: str, results: dict[str, list[dict]], spec: str) -> dict:
    """Move a task's staged files into place, write its HDF5/manifest, then its sidecar (last)."""
    tspec = TASKS[task]
    if task in DENSE:
        return _finish_dense_task(out, task, results, spec)
    patches = out / PATCHES_DIR
    staging = patches / f".{task}.staging"
    counts = {}
    for split in SPLITS:
        parts = results.get(split, [])
        y = np.concatenate([p["y"] for p in parts]) if parts else np.zeros(0, np.float32)
        counts[split] = int(len(y))
        target = out / (tspec.path if split == "train" else tspec.val_path)
        if tspec.format == "hdf5":
            x = np.concatenate([p["x"] for p in parts]) if parts else np.zeros((0, 0, 0, 3), np.uint8)
            _write_h5(target, x, y, _split_canvases(parts) if task in HELD_OUT else None)
        elif tspec.format == "folder":
            source = staging / split
            source.mkdir(parents=True, exist_ok=True)
            if target.exists():
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
        else:  # manifest: images/ next to the CSVs, paths relative to the manifest
            names = [n for p in parts for n in p["names"]]
            rows = [{"path": n, "label": repr(float(v))} for n, v in zip(names, y)]
            write_bytes_atomic(staging / f"{split}.csv", _csv_text(rows, ("path", "label")).encode())
    if tspec.format == "manifest":
        target_dir = out / Path(tspec.path).parent
        if target_dir.exists():
            shutil.rmtree(target_dir)
        os.replace(staging, target_dir)
    elif staging.exists():
        shutil.rmtree(staging)
    summary = {"name": task, "spec": spec, "format": tspec.format, "train": counts["train"], "val": counts["val"]}
    if tspec.kind != "regression":
        summary["class_counts"] = {
            split: np.bincount(
                np.concatenate([p["y"] for p in results.get(split, [])]).astype(int)
                if results.get(split) else np.zeros(0, int),
                minlength=len(tspec.classes or ()),  # set for every kind but regression
            ).tolist()
            for split in SPLITS
        }
    write_json_atomic(patches / f"{task}.json", summary)
    return summary


def _tasks_yaml(config: SynthConfig, held_out: bool = False) -> str:
    """tasks.yaml (the tasks encoders train on) or, `held_out`, heldout_tasks.yaml (the rest)."""
    tasks = [TASKS[name].to_yaml_dict() for name in config.patches.tasks if (name in HELD_OUT) == held_out]
    return yaml.safe_dump({"tasks": tasks}, sort_keys=False)


def _remove_stale_slides(out: Path, keep: set[str]) -> None:
    """Slides of an earlier, larger run with another plan would be picked up downstream: drop them."""
    folder = out / SLIDES_DIR
    if not folder.exists():
        return
    for path in folder.glob("S*.tiff"):
        if path.stem not in keep:
            path.unlink()
            path.with_suffix(".json").unlink(missing_ok=True)


@stage_storage
def run_synth(config: SynthConfig) -> int:
    """Generate (or complete) the cohort in `config.out`; 0 on success."""
    # Here, not at the top: nic.slides loads OpenSlide and scikit-image, which the Ray workers
    # that import this module for render_slide never need.
    from nic.slides.stage import prepare_out

    out = Path(config.out)
    prepare_out(out, config, "config.yaml", clean=_clear_leftovers)
    plan = _plan(out, config)
    if plan.total:
        _render(out, config, plan)
    files = _write_task_files(out, config, plan)
    write_json_atomic(out / "cohort.json", _cohort_record(config, plan, files))
    return _report(out, config, plan)


def _clear_leftovers(out: Path) -> None:
    """What an interrupted run left in `out`: temporary files and patch staging folders (a chunk's
    files there may be half written)."""
    clean_stale_temporaries(out)
    for stale in (out / PATCHES_DIR).glob(".*.staging") if (out / PATCHES_DIR).exists() else []:
        shutil.rmtree(stale)


@dataclass
class _SynthPlan:
    """The cohort and what of it is left to make: the slides (all of them, `todo` the ones to
    render), the patch tasks (`patch_todo`, cut into `chunks`), their spec hashes, and the
    status of each as the run learns it (`status` per slide, `task_status` per patch task)."""

    slides: list[SlideParams]
    patients: dict
    specs: dict[str, str]
    todo: list[SlideParams]
    task_specs: dict[str, str]
    patch_todo: list[str]
    chunks: list[Chunk]
    sidecars: dict[str, dict] = field(default_factory=dict)
    status: dict[str, dict] = field(default_factory=dict)
    task_status: dict[str, dict] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Ray tasks to run: one per slide to render, one per patch chunk."""
        return len(self.todo) + len(self.chunks)


def _plan(out: Path, config: SynthConfig) -> _SynthPlan:
    """Plan the cohort from the seed and split it into done and to-do: a slide is done when its
    sidecar and file verify (`_slide_is_complete`), a patch task when its sidecar matches. Slides
    of an earlier plan that are not in this one are deleted, so nothing downstream picks them up."""
    slides, patients = plan_cohort(config)
    _remove_stale_slides(out, {s.slide_id for s in slides})
    specs = {s.slide_id: spec_hash(_slide_spec(s, config)) for s in slides}
    sidecars: dict[str, dict] = {}
    status: dict[str, dict] = {}
    todo: list[SlideParams] = []
    for s in slides:
        done = _slide_is_complete(out, s.slide_id, specs[s.slide_id])
        if done is not None:
            sidecars[s.slide_id] = done
            status[s.slide_id] = {"status": STATUS_SKIPPED, "reason": "already complete and verified"}
        else:
            todo.append(s)

    task_specs = {t: _patch_spec(config, t) for t in config.patches.tasks}
    patch_todo = [t for t in config.patches.tasks if not _task_is_complete(out, t, task_specs[t])]
    chunks = [c for c in plan_chunks(config) if c.task in patch_todo]
    task_status: dict[str, dict] = {
        t: {"status": STATUS_SKIPPED, "reason": "already complete"} for t in config.patches.tasks if t not in patch_todo
    }
    return _SynthPlan(slides, patients, specs, todo, task_specs, patch_todo, chunks, sidecars, status, task_status)


def _render(out: Path, config: SynthConfig, plan: _SynthPlan) -> None:
    """Render what is left on Ray (slides biggest first, then patch chunks), record each result
    or failure in `plan` as it arrives, then assemble the patch tasks whose chunks all succeeded."""
    import ray

    from nic.runtime import Progress, connect

    progress = Progress("synth", total=plan.total, unit="tasks")
    connect(config.ray, config.verbose)
    pending = _submit(out, config, plan)
    chunk_results: dict[str, dict[str, dict[int, dict]]] = {t: {s: {} for s in SPLITS} for t in plan.patch_todo}
    failed_tasks: set[str] = set()
    done_slides = done_chunks = processed = 0
    refs = list(pending)
    while refs:
        ready, refs = ray.wait(refs, num_returns=1)
        kind, item = pending.pop(ready[0])
        try:
            result = ray.get(ready[0])
        except Exception as exc:  # a task failed: record why, keep going
            reason = _short_error(exc)
            if kind == "slide":
                plan.status[item] = {"status": STATUS_FAILED, "reason": reason}
            else:
                failed_tasks.add(item.task)
                plan.task_status[item.task] = {"status": STATUS_FAILED, "reason": reason}
            result = None
        if result is not None:
            if kind == "slide":
                plan.sidecars[item] = result
                plan.status[item] = {"status": STATUS_OK, "reason": ""}
                done_slides += 1
            else:
                chunk_results[item.task][item.split][item.index] = result
                done_chunks += 1
        processed += 1
        progress.update(
            processed,
            extra=f"slides {done_slides}/{len(plan.todo)}, patch chunks {done_chunks}/{len(plan.chunks)}",
        )
    _finish_patch_tasks(out, plan, chunk_results, failed_tasks)
    progress.finish(extra=f"slides {done_slides}/{len(plan.todo)}, patch chunks {done_chunks}/{len(plan.chunks)}")


def _submit(out: Path, config: SynthConfig, plan: _SynthPlan) -> dict[Any, tuple[str, Any]]:
    """Start one Ray task per slide to render and per patch chunk; returns what each reference
    is ("slide", slide id) or ("chunk", Chunk). Biggest slides first, so the tail of the run is
    short tasks; each patch task's staging folder exists before its chunks write into it."""
    import ray

    remote_slide = ray.remote(num_cpus=1, max_retries=0)(render_slide)
    remote_chunk = ray.remote(num_cpus=1, max_retries=0)(render_patch_chunk)
    config_dict = config.model_dump(mode="json")
    pending: dict[Any, tuple[str, Any]] = {}
    for s in sorted(plan.todo, key=lambda p: -p.width * p.height):
        ref = remote_slide.remote(
            s.to_dict(), str(out), config.render.tile_size, config.render.quality, plan.specs[s.slide_id]
        )
        pending[ref] = ("slide", s.slide_id)
    for task in plan.patch_todo:
        staging = out / PATCHES_DIR / f".{task}.staging"
        staging.mkdir(parents=True, exist_ok=True)
    for c in plan.chunks:
        staging = out / PATCHES_DIR / f".{c.task}.staging"
        pending[remote_chunk.remote(config_dict, c, str(staging))] = ("chunk", c)
    return pending


def _finish_patch_tasks(out: Path, plan: _SynthPlan, chunk_results: dict[str, dict[str, dict[int, dict]]],
                        failed_tasks: set[str]) -> None:
    """Write each patch task whose chunks all succeeded from its chunks in index order (the order
    the seed fixes, not the order they finished), and drop its staging folder."""
    for task in plan.patch_todo:
        if task in failed_tasks:
            continue
        ordered = {split: [chunk_results[task][split][i] for i in sorted(chunk_results[task][split])]
                   for split in SPLITS}
        staging = out / PATCHES_DIR / f".{task}.staging"
        ensure_local(staging, missing_ok=True)  # staged by tasks on other nodes (object stores)
        summary = _finish_patch_task(out, task, ordered, plan.task_specs[task])
        if uri_for(staging) is not None:
            remove(staging)
        plan.task_status[task] = {"status": STATUS_OK, "reason": "", "train": summary["train"], "val": summary["val"]}


def _write_task_files(out: Path, config: SynthConfig, plan: _SynthPlan) -> dict[str, str]:
    """labels.csv, truth.json and the task lists, rewritten on every run (they are cheap and
    follow the config); returns cohort.json's `files`."""
    _write_labels_and_truth(out, config, plan.slides, plan.patients, plan.sidecars)
    write_bytes_atomic(out / "tasks.yaml", _tasks_yaml(config).encode())
    files = {"labels": "labels.csv", "truth": "truth.json", "tasks": "tasks.yaml", "config": "config.yaml"}
    if any(t in HELD_OUT for t in config.patches.tasks):
        write_bytes_atomic(out / HELDOUT_YAML, _tasks_yaml(config, held_out=True).encode())
        files["heldout_tasks"] = HELDOUT_YAML
    else:  # from an earlier run with other tasks: it would name data this run did not make
        (out / HELDOUT_YAML).unlink(missing_ok=True)
    return files


def _cohort_record(config: SynthConfig, plan: _SynthPlan, files: dict[str, str]) -> dict:
    """cohort.json: what was made, per slide and per patch task, with its status; written last,
    it is the cohort's completion marker."""
    sidecars, status = plan.sidecars, plan.status
    return {
        "generator_version": GENERATOR_VERSION,
        "seed": config.seed,
        "config_hash": cohort_config_hash(config),
        "slides": [
            {
                "slide_id": s.slide_id,
                "patient_id": s.patient_id,
                "path": f"{SLIDES_DIR}/{s.slide_id}.tiff",
                "width": s.width,
                "height": s.height,
                "mpp": s.mpp,
                **status[s.slide_id],
                **({k: sidecars[s.slide_id][k] for k in ("bytes", "sha256", "levels", "seconds")}
                   if s.slide_id in sidecars else {}),
            }
            for s in plan.slides
        ],
        "patch_tasks": [{"name": t, **plan.task_status.get(t, {})} for t in config.patches.tasks],
        "files": files,
    }


def _report(out: Path, config: SynthConfig, plan: _SynthPlan) -> int:
    """Print the failed slides and a summary line; the exit code of every slide stage
    (nic.slides.stage.exit_code), where a failed patch task counts as a failure too."""
    from nic.slides.stage import exit_code  # see run_synth

    slides, status, task_status = plan.slides, plan.status, plan.task_status
    ok_slides = [s.slide_id for s in slides if status[s.slide_id]["status"] != STATUS_FAILED]
    n_failed = len(slides) - len(ok_slides) + sum(1 for v in task_status.values() if v["status"] == STATUS_FAILED)
    for s in slides:
        if status[s.slide_id]["status"] == STATUS_FAILED:
            log.warning(f"[synth] slide {s.slide_id} failed: {status[s.slide_id]['reason']}", extra=TO_STDOUT)
    log.info(f"[synth] cohort in {display(out)}: {len(ok_slides)}/{len(slides)} slides, "
             f"{sum(1 for v in task_status.values() if v['status'] != STATUS_FAILED)}/{len(config.patches.tasks)} "
             f"patch tasks", extra=TO_STDOUT)
    return exit_code(len(ok_slides), n_failed, config.strict)


def _short_error(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    text = f"{type(cause).__name__}: {cause}"
    if len(text) > 500:
        text = text[:500] + "..."
    if os.environ.get("NIC_DEBUG"):
        traceback.print_exception(exc)
    return text


def _write_labels_and_truth(
    out: Path, config: SynthConfig, slides: list[SlideParams], patients: dict, sidecars: dict[str, dict]
) -> None:
    rows, truth_slides = [], []
    for s in slides:
        patient = patients[s.patient_id]
        t = targets(patient, config)
        rows.append(
            {
                "slide_id": s.slide_id,
                "patient_id": s.patient_id,
                "path": f"{SLIDES_DIR}/{s.slide_id}.tiff",
                "proliferation": repr(round(t["proliferation"], 6)),
                "growth_pattern": t["growth_pattern"],
                "growth_pattern_name": t["growth_pattern_name"],
                "time": repr(round(t["time"], 4)),
                "event": t["event"],
                "width": s.width,
                "height": s.height,
                "mpp": s.mpp,
            }
        )
        realised = sidecars.get(s.slide_id, {}).get("realised")
        truth_slides.append(
            {"params": s.to_dict(), "targets": t, "covariates": covariates(patient), "realised": realised}
        )
    write_bytes_atomic(out / "labels.csv", _csv_text(rows, LABEL_COLUMNS).encode())
    truth = {
        "generator_version": GENERATOR_VERSION,
        "seed": config.seed,
        "config": config_identity(config),
        "classes": list(CLASSES),
        "proliferation": {
            "definition": "proliferation = log_mitotic_z + proliferation_noise_sd * proliferation_noise; "
            "mitotic_fraction = median * exp(spread * log_mitotic_z) * (0.3 + 0.7 * snr)",
            "median_mitotic_fraction": config.signal.mitotic_fraction,
            "spread": config.signal.mitotic_spread,
            "proliferation_noise_sd": config.signal.proliferation_noise,
        },
        "apoptosis": {
            "definition": "apoptotic_fraction = median * exp(spread * z), z standard normal per slide, independent "
            "of the patient; apoptotic bodies are mitosis look-alikes and no target depends on them",
            "median_apoptotic_fraction": config.signal.apoptotic_fraction,
            "spread": APOPTOTIC_SPREAD,
        },
        "survival": {
            "model": "Weibull proportional hazards: S(t|x) = exp(-(t / scale)^shape * exp(beta . x)); "
            "event_time = scale * (-log(event_u) / exp(beta . x))^(1 / shape); "
            "time = min(event_time, min(follow_up, dropout)); event = event_time <= min(follow_up, dropout)",
            "coefficients": hazard_coefficients(config),
            "shape": config.survival.weibull_shape,
            "scale_months": config.survival.weibull_scale_months,
            "follow_up_months": config.survival.follow_up_months,
            "covariates": {
                "proliferation": "log_mitotic_z (standard normal)",
                "desmoplastic": "1 if growth_pattern == desmoplastic else 0",
                "til": f"(til_density - {TIL_MEAN}) / {TIL_SD}",
                "necrosis": f"(necrosis_fraction - {NECROSIS_MEAN:.6g}) / {NECROSIS_SD:.6g}",
            },
        },
        "patients": [patients[k].to_dict() for k in sorted(patients)],
        "slides": truth_slides,
    }
    write_json_atomic(out / "truth.json", truth)
