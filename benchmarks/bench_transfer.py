"""Transfer benchmark (issue 15, item 6): a linear probe on frozen embeddings of a held-out patch task.

The claim of both seeds (supervised multitask NIC, Tellez et al. MIDL 2020; Cerberus, Graham et al.
MedIA 2023) is that features learned on some tasks carry tasks never trained on. `nic synth` makes
such a task, `apoptosis` (an apoptotic body in the tile or not; binary, 50 % positives, tumour-rich
tiles with mitotic figures as look-alikes; docs/synth.md), and lists it in heldout_tasks.yaml, never
in tasks.yaml, so no encoder trains on it. For each encoder this script

1. embeds the task's train + val patches with the frozen encoder (`nic.encoders.load_encoder`, CPU,
   batches of --batch; the module `nic compress` runs);
2. fits a linear probe: the embedding standardised on the training folds, then L2 logistic
   regression, its C chosen from 1e-4..1e2 by an inner 3-fold CV on the training folds only;
3. scores out-of-fold predictions of a fixed 5-fold CV (stratified; grouped by the canvas each tile
   was cut from, so tiles sharing a stain and a scene never sit on both sides of a split; --seed
   fixes the folds, the same for every encoder): ROC AUC for a binary task (over pairs within a
   fold, see `score`), balanced accuracy for a multiclass one, with a 95 % percentile bootstrap
   interval over canvases (clusters), and the paired difference to the first encoder with its own
   interval (the same resamples for all).

With --study (a `nic pipeline` run folder) the encoders are the study's (trained ones from
<study>/encoders/<name>, built-ins by name), the cohort is <study>/cohort, and the slide-level
results of every target (<study>/models/<encoder>/<target>/metrics.json: the CNN's and the
linear probe's out-of-fold metric with CI) are tabulated beside the patch-level probe.

`--write` puts the tables into benchmarks/results/encoders.md between the bench_transfer markers,
with this command and the machine. The default (about 3000 patches x 5 encoders) takes a few
minutes on 2 CPUs: embedding is ~500 tiles per CPU-second for the reference trunk.

Commands for the full run (issue 15: MTL with dense tasks, MTL patch tasks only, contrastive,
random, mean-RGB; and the demo study's three slide-level targets with and without dense tasks):

    # everything in one study (cohort with the dense and held-out tasks, 5 encoders, 3 targets):
    .venv/bin/nic pipeline --config configs/studies/transfer.yaml
    .venv/bin/python benchmarks/bench_transfer.py --study runs/transfer --write

    # or stage by stage (patch-level only), the same encoders:
    .venv/bin/nic synth --config configs/demo/synth.yaml --set out=runs/transfer/cohort \\
        --set patches.train=2400 --set patches.val=600 \\
        --set "patches.tasks=[tissue_type, tumour, mitosis, lymphocyte_density, nuclei, tissue_regions, apoptosis]"
    .venv/bin/nic train-encoder --config configs/demo/train_encoder.yaml --tasks runs/transfer/cohort/tasks.yaml \\
        --out runs/transfer/encoders/mtl-dense --name mtl-dense
    .venv/bin/nic train-encoder --config configs/demo/train_encoder.yaml --tasks runs/transfer/cohort/tasks.yaml \\
        --out runs/transfer/encoders/mtl --name mtl \\
        --set "tasks_subset=[tissue_type, tumour, mitosis, lymphocyte_density]"
    .venv/bin/nic train-encoder --config configs/demo/train_encoder.yaml --tasks runs/transfer/cohort/tasks.yaml \\
        --out runs/transfer/encoders/contrastive --name contrastive --kind contrastive --epochs 3
    .venv/bin/python benchmarks/bench_transfer.py --cohort runs/transfer/cohort \\
        --encoder mtl-dense=runs/transfer/encoders/mtl-dense --encoder mtl=runs/transfer/encoders/mtl \\
        --encoder contrastive=runs/transfer/encoders/contrastive --encoder random --encoder mean-rgb --write
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from machine_info import cpu_model, ram_gib  # noqa: E402  (benchmarks/ is on sys.path)

RESULTS = Path(__file__).resolve().parent / "results" / "encoders.md"
START, END = "<!-- bench_transfer:start -->", "<!-- bench_transfer:end -->"
HELDOUT_YAML = "heldout_tasks.yaml"
BUILTINS = ("random", "mean-rgb")
CS = tuple(float(c) for c in np.logspace(-4, 2, 7))
"""Inverse L2 penalties the inner CV chooses from."""


# ------------------------------------------------------------------------------------------ the probe
@dataclass
class ProbeResult:
    """Out-of-fold scores of a linear probe and its metric with a bootstrap 95 % CI."""

    metric: str  # roc_auc | balanced_accuracy
    value: float
    ci_low: float
    ci_high: float
    oof: np.ndarray  # (N,) P(positive) for binary, (N, K) class probabilities for multiclass
    folds: np.ndarray  # (N,) the outer fold of each sample
    chosen_c: list[float] = field(default_factory=list)  # C picked in each outer fold
    boot: np.ndarray | None = None  # the metric on each bootstrap resample (for paired differences)


def metric_name(kind: str) -> str:
    return "roc_auc" if kind == "binary" else "balanced_accuracy"


def score(kind: str, y: np.ndarray, oof: np.ndarray, folds: np.ndarray | None = None) -> float:
    """ROC AUC (binary, `oof` = P(positive)) or balanced accuracy (multiclass, `oof` = probabilities).

    With `folds`, the AUC counts only (positive, negative) pairs from the same fold: the folds'
    models differ (an intercept shifts with a fold's class balance), so pairs across folds would
    compare scores of different models, which pulls an uninformative embedding's pooled AUC below
    0.5. This equals the folds' AUCs averaged with weights n_pos x n_neg.

    Computed directly (the Mann-Whitney U with average ranks for ties; the mean recall over the
    classes present), equal to scikit-learn's roc_auc_score and balanced_accuracy_score and ~50 x
    faster, which the bootstrap's thousands of resamples per encoder need."""
    from scipy.stats import rankdata

    y = np.asarray(y)
    if kind == "binary":
        u = pairs = 0.0
        for k in (np.unique(folds) if folds is not None else [None]):
            part = slice(None) if k is None else folds == k
            pos = y[part] == 1
            n1, n0 = int(pos.sum()), int((~pos).sum())
            if n1 and n0:
                u += rankdata(np.asarray(oof)[part])[pos].sum() - n1 * (n1 + 1) / 2
                pairs += n1 * n0
        return float(u / pairs) if pairs else math.nan
    predicted = np.asarray(oof).argmax(axis=1)
    return float(np.mean([np.mean(predicted[y == k] == k) for k in np.unique(y)]))


def outer_folds(y: np.ndarray, groups: np.ndarray | None, folds: int, seed: int) -> np.ndarray:
    """The outer fold (0..folds-1) of each sample: stratified, grouped when `groups` are given,
    shuffled with `seed` (a pure function of labels, groups and seed: the same for every encoder)."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    out = np.full(len(y), -1, np.int64)
    if groups is None:
        splitter = StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y)
    else:
        splitter = StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y, groups)
    for k, (_, test) in enumerate(splitter):
        out[test] = k
    return out


def bootstrap_indices(n: int, groups: np.ndarray | None, n_boot: int, seed: int) -> list[np.ndarray]:
    """Resamples of the sample indices: whole groups (clusters) drawn with replacement when `groups`
    are given, single samples otherwise. Shared by every encoder, so differences are paired."""
    rng = np.random.default_rng(seed)
    if groups is None:
        return [rng.integers(0, n, n) for _ in range(n_boot)]
    uniq, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(uniq))]
    return [np.concatenate([members[g] for g in rng.integers(0, len(uniq), len(uniq))]) for _ in range(n_boot)]


def percentile_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if len(values) < 10:
        return math.nan, math.nan
    alpha = (1 - level) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))


def linear_probe(x: np.ndarray, y: np.ndarray, kind: str = "binary", groups: np.ndarray | None = None,
                 folds: int = 5, seed: int = 0, n_boot: int = 1000,
                 resamples: list[np.ndarray] | None = None, cs: tuple[float, ...] = CS) -> ProbeResult:
    """Cross-validated linear probe of frozen embeddings `x` (N, C) for labels `y` (N,) (class indices).

    Per outer fold: standardise on the training part, pick C from `cs` by an inner 3-fold CV (grouped
    and stratified like the outer one) on the training part only, refit, predict the held-out part.
    The metric of the out-of-fold predictions comes with a percentile bootstrap 95 % CI over
    `resamples` (default: `n_boot` cluster resamples of `groups`, seeded by `seed`).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(x, np.float64)
    y = np.asarray(y).astype(np.int64)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"embeddings must be (N, C) with N = {len(y)} labels, got {x.shape}")
    n_classes = int(y.max()) + 1
    if kind == "binary" and n_classes != 2:
        raise ValueError(f"a binary task needs labels 0 and 1, got classes 0..{n_classes - 1}")
    fold = outer_folds(y, groups, folds, seed)
    oof = np.zeros(len(y)) if kind == "binary" else np.zeros((len(y), n_classes))
    chosen = []
    for k in range(folds):
        train, test = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
        scaler = StandardScaler().fit(x[train])
        xt, xv = scaler.transform(x[train]), scaler.transform(x[test])
        if groups is None:
            inner = list(StratifiedKFold(3, shuffle=True, random_state=seed).split(xt, y[train]))
        else:
            inner = list(StratifiedGroupKFold(3, shuffle=True, random_state=seed).split(xt, y[train], groups[train]))
        model = LogisticRegressionCV(Cs=list(cs), cv=inner, max_iter=5000,
                                     scoring="roc_auc" if kind == "binary" else "balanced_accuracy")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            warnings.simplefilter("ignore", FutureWarning)
            model.fit(xt, y[train])
        proba = model.predict_proba(xv)
        if kind == "binary":
            oof[test] = proba[:, list(model.classes_).index(1)]
        else:
            oof[np.ix_(test, model.classes_)] = proba
        chosen.append(float(np.ravel(model.C_)[0]))
    value = score(kind, y, oof, fold)
    if resamples is None:
        resamples = bootstrap_indices(len(y), groups, n_boot, seed)
    boot = np.array([score(kind, y[idx], oof[idx], fold[idx]) for idx in resamples]) if resamples else np.zeros(0)
    lo, hi = percentile_ci(boot)
    return ProbeResult(metric_name(kind), value, lo, hi, oof, fold, chosen, boot)


def paired_difference(a: ProbeResult, b: ProbeResult) -> tuple[float, float, float]:
    """a - b and the 95 % interval of the difference over the shared resamples."""
    lo, hi = percentile_ci(a.boot - b.boot) if a.boot is not None and b.boot is not None else (math.nan, math.nan)
    return a.value - b.value, lo, hi


# ------------------------------------------------------------------------------------- data, encoders
def load_heldout(cohort: Path, task: str, max_patches: int | None, seed: int):
    """Images (N, P, P, 3) uint8, labels (N,), groups (N,) (split-unique canvas ids, or None) and the
    task spec, from the cohort's heldout_tasks.yaml (train and val together)."""
    from nic.patches.readers import open_hdf5, read_patches
    from nic.patches.tasks import load_tasks

    yaml_path = cohort / HELDOUT_YAML
    if not yaml_path.is_file():
        raise SystemExit(f"{yaml_path}: not found; make the cohort with the held-out task, e.g. "
                         "nic synth ... --set \"patches.tasks=[..., apoptosis]\"")
    specs = {t.name: t for t in load_tasks(yaml_path)}
    if task not in specs:
        raise SystemExit(f"{yaml_path}: no task '{task}' (it lists {', '.join(specs)})")
    spec = specs[task]
    if spec.kind not in ("binary", "multiclass"):
        raise SystemExit(f"task '{task}' is {spec.kind}: the probe scores binary and multiclass tasks")
    images, labels, groups = [], [], []
    tile_px = None
    for split, path in enumerate(p for p in (spec.path, spec.val_path) if p is not None):
        if tile_px is None:
            tile_px = _tile_px(spec, path)
        data = read_patches(spec, path, tile_px)
        images.append(data.images)
        labels.append(data.labels.astype(np.int64))
        canvas = None
        if spec.format == "hdf5":
            with open_hdf5(spec, path) as handle:
                canvas = handle["canvas"][...].astype(np.int64) if "canvas" in handle else None
        groups.append(None if canvas is None else canvas + split * 10**7)  # val canvases are other canvases
    x, y = np.concatenate(images), np.concatenate(labels)
    g = None if any(v is None for v in groups) else np.concatenate(groups)
    if max_patches is not None and len(y) > max_patches:
        from sklearn.model_selection import train_test_split

        keep, _ = train_test_split(np.arange(len(y)), train_size=max_patches, stratify=y, random_state=seed)
        keep = np.sort(keep)
        x, y, g = x[keep], y[keep], None if g is None else g[keep]
    return x, y, g, spec


def _tile_px(spec, path: Path) -> int:
    from nic.patches.readers import IMAGE_SUFFIXES, open_hdf5

    if spec.format == "hdf5":
        with open_hdf5(spec, path) as handle:
            return int(handle["x"].shape[1])
    from PIL import Image

    first = next(p for p in sorted(Path(path).rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES)
    with Image.open(first) as img:
        return int(img.size[0])


@dataclass
class EncoderRef:
    name: str
    ref: str  # an encoder folder or a built-in name


def study_encoders(study: Path) -> list[EncoderRef]:
    """The encoders of a `nic pipeline` run, in its config's order: built-ins by name, trained ones
    from <study>/encoders/<name>. External encoders are left out (their tile size may differ)."""
    import yaml

    config = yaml.safe_load((study / "pipeline_config.yaml").read_text())
    out = []
    for run in config.get("encoders") or []:
        if run["kind"] in BUILTINS and not run.get("settings"):
            out.append(EncoderRef(run["name"], run["kind"]))
        elif run["kind"] == "external":
            print(f"[transfer] {run['name']}: an external encoder, left out (pass it with --encoder)", flush=True)
        else:
            out.append(EncoderRef(run["name"], str(study / "encoders" / run["name"])))
    return out


def parse_encoder(text: str) -> EncoderRef:
    """NAME=PATH or a built-in name."""
    if "=" in text:
        name, ref = text.split("=", 1)
        return EncoderRef(name, ref)
    if text not in BUILTINS and not Path(text).exists():
        raise argparse.ArgumentTypeError(f"{text}: neither NAME=PATH, an encoder folder, nor a built-in "
                                         f"({', '.join(BUILTINS)})")
    return EncoderRef(Path(text).name if text not in BUILTINS else text, text)


def embed(ref: str, images: np.ndarray, batch: int) -> tuple[np.ndarray, object]:
    """Frozen embeddings (N, C) float32 of uint8 (N, P, P, 3) images, and the EncoderInfo."""
    import torch

    from nic.encoders import load_encoder

    module, info = load_encoder(ref, device="cpu")
    if info.tile_px != images.shape[1]:
        raise SystemExit(f"{ref}: encoder takes {info.tile_px} px tiles, the task's patches are "
                         f"{images.shape[1]} px")
    out = np.empty((len(images), info.embedding_dim), np.float32)
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            chunk = torch.from_numpy(images[start : start + batch]).permute(0, 3, 1, 2)  # NHWC memory: channels-last
            out[start : start + len(chunk)] = module(chunk).float().numpy()
    return out, info


def describe(info) -> str:
    tasks = [t.get("name") for t in info.tasks or []]
    what = info.kind if info.kind == info.architecture else f"{info.kind}, {info.architecture}"
    if getattr(info, "trunk_pool", None):
        what += f" ({info.trunk_pool})"
    if not tasks:
        return what
    # a contrastive encoder reads the tasks' images without their labels
    label = "images of (unlabelled)" if info.kind == "contrastive" else "tasks"
    return what + f"; {label}: {', '.join(tasks)}"


# ------------------------------------------------------------------------------------- slide level
def slide_level_rows(study: Path, encoders: list[str]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the study's slide-level results per encoder and target: the CNN's
    out-of-fold primary metric [CI]; the slide-level linear probe's."""
    targets: list[str] = []
    for enc in encoders:
        folder = study / "models" / enc
        if folder.is_dir():
            targets += [p.name for p in sorted(folder.iterdir())
                        if (p / "metrics.json").is_file() and p.name not in targets]
    rows = []
    primaries: dict[str, str] = {}
    for enc in encoders:
        row = [enc]
        for t in targets:
            try:
                metrics = json.loads((study / "models" / enc / t / "metrics.json").read_text())
            except (OSError, ValueError):
                row.append("n/a")
                continue
            primary = metrics.get("primary_metric")
            primaries.setdefault(t, primary)
            cnn = ((metrics.get("cv") or {}).get("metrics") or {}).get(primary)
            probe = (((metrics.get("probe") or {}).get("cv") or {}).get("metrics") or {}).get(primary)
            row.append(f"{_fmt(cnn)}; probe {_fmt(probe)}")
        rows.append(row)
    return ["encoder", *(f"{t} ({primaries.get(t, '?')})" for t in targets)], rows


# The issue's goals on the encoders' own validation sets: dense metrics of the encoder trained with
# the dense tasks, and the most the patch tasks may lose against the encoder trained without them.
DENSE_GOALS = {"nuclei/dice": 0.8, "nuclei/count_r": 0.9, "tissue_regions/dice": 0.8}
PATCH_LOSS_LIMIT = 0.02
PATCH_METRICS = ("auc", "acc", "r2")  # per patch task, the first it reports (binary, multiclass, regression)


def encoder_metric_lines(study: Path, encoders: list[str], with_dense: str = "mtl-dense",
                         without_dense: str = "mtl") -> list[str]:
    """Markdown lines: the dense-task metrics of `with_dense` against DENSE_GOALS, and each patch
    task's validation metric with and without the dense tasks (encoder.json's `metrics`, the last
    epoch's validation set of each encoder; one training run each, so no interval)."""
    metrics = {}
    for enc in (with_dense, without_dense):
        path = study / "encoders" / enc / "encoder.json"
        if enc in encoders and path.is_file():
            metrics[enc] = json.loads(path.read_text()).get("metrics") or {}
    if with_dense not in metrics:
        return []
    dense = metrics[with_dense]
    lines = ["", f"Dense tasks, `{with_dense}`'s validation set (encoder.json metrics; goal from issue 15):", "",
             "| metric | value | goal | met |", "| --- | ---: | ---: | --- |"]
    for key, goal in DENSE_GOALS.items():
        value = dense.get(key)
        shown = "n/a" if value is None else f"{value:.3f}"
        met = "n/a" if value is None else ("yes" if value >= goal else "no")
        lines.append(f"| {key} | {shown} | >= {goal:g} | {met} |")
    extra = sorted(k for k in dense if k.split("/")[0] in {"nuclei", "tissue_regions"}
                   and k not in DENSE_GOALS and not k.endswith("/loss"))
    if extra:
        lines.append("")
        lines.append("Also: " + ", ".join(f"{k} {dense[k]:.3f}" for k in extra) + ".")
    if without_dense in metrics:
        plain = metrics[without_dense]
        tasks = sorted({k.split("/")[0] for k in plain if "/" in k})
        lines += ["", f"Patch tasks with (`{with_dense}`) and without (`{without_dense}`) the dense tasks "
                  f"(goal: lose at most {PATCH_LOSS_LIMIT:g}):", "",
                  f"| task | metric | {without_dense} | {with_dense} | difference | within {PATCH_LOSS_LIMIT:g} |",
                  "| --- | --- | ---: | ---: | ---: | --- |"]
        for task in tasks:
            name = next((m for m in PATCH_METRICS if f"{task}/{m}" in plain), None)
            if name is None or f"{task}/{name}" not in dense:
                continue
            a, b = plain[f"{task}/{name}"], dense[f"{task}/{name}"]
            lines.append(f"| {task} | {name} | {a:.3f} | {b:.3f} | {b - a:+.3f} | "
                         f"{'yes' if b - a >= -PATCH_LOSS_LIMIT else 'no'} |")
    return lines


def head_predictions(ref: str, images: np.ndarray, batch: int) -> tuple[np.ndarray, tuple[str, ...]]:
    """Every task head's output (N, K) of an MTL encoder on uint8 (N, P, P, 3) images, with its
    column names: the heads `nic compress --heads` runs (nic.encoders.head_maps), on the embedding
    of the inference encoder, as in a grid."""
    import torch

    from nic.encoders import load_encoder
    from nic.encoders.head_maps import load_head_mapper

    module, _ = load_encoder(ref, device="cpu")
    mapper = load_head_mapper(ref)
    parts = []
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            tiles = torch.from_numpy(images[start : start + batch]).permute(0, 3, 1, 2)
            parts.append(mapper(tiles, module(tiles)).numpy())
    return np.concatenate(parts), tuple(mapper.columns)


def task_metric(kind: str, y: np.ndarray, pred: np.ndarray) -> float:
    """The patch task's validation metric as encoder.json reports it: AUC (binary; `pred` is the
    positive class's probability), accuracy (multiclass; `pred` the class probabilities), R^2
    (regression)."""
    from sklearn.metrics import r2_score, roc_auc_score

    if kind == "binary":
        return float(roc_auc_score(y, pred)) if len(np.unique(y)) == 2 else math.nan
    if kind == "multiclass":
        return float(np.mean(np.argmax(pred, axis=1) == y))
    return float(r2_score(y, pred))


def _task_outputs(pred: np.ndarray, columns: tuple[str, ...], task: str, kind: str) -> np.ndarray:
    chosen = [i for i, c in enumerate(columns) if c == f"head:{task}" or c.startswith(f"head:{task}=")]
    out = pred[:, chosen]
    return out if kind == "multiclass" else out[:, 0]


def patch_task_comparison(study: Path, with_dense: str = "mtl-dense", without_dense: str = "mtl",
                          batch: int = 256, n_boot: int = 1000, seed: int = 0) -> list[str]:
    """Markdown lines: each patch task's validation metric for the encoders with and without the
    dense tasks, re-evaluated here from their heads on the same validation patches (all of them),
    with the paired difference and its 95 % bootstrap CI (the same resamples for both encoders,
    whole canvases when the task records them). encoder.json's metrics are one number per
    encoder from one training run; the interval says how much of a difference the validation set
    can tell apart, which a 0.02 goal needs."""
    from nic.patches.readers import open_hdf5, read_patches
    from nic.patches.tasks import load_tasks

    folders = {e: study / "encoders" / e for e in (with_dense, without_dense)}
    if not all((f / "encoder.json").is_file() for f in folders.values()):
        return []
    infos = {e: json.loads((f / "encoder.json").read_text()) for e, f in folders.items()}
    trained = {e: {t["name"] for t in info.get("tasks") or []} for e, info in infos.items()}
    tile_px = int(infos[with_dense]["tile_px"])  # the patches are read at the size the encoders trained on
    specs = [t for t in load_tasks(study / "cohort" / "tasks.yaml")
             if t.kind in ("binary", "multiclass", "regression") and t.val_path is not None
             and t.name in trained[with_dense] & trained[without_dense]]
    lines = ["", f"Patch tasks re-evaluated here from the heads of `{without_dense}` and `{with_dense}` on every "
             f"validation patch, paired difference with a 95 % bootstrap CI ({n_boot} resamples, by canvas "
             "where the task records canvases, else by patch):", "",
             f"| task | metric | patches | {without_dense} | {with_dense} | difference [95 % CI] | loses <= "
             f"{PATCH_LOSS_LIMIT:g} |", "| --- | --- | ---: | ---: | ---: | --- | --- |"]
    for spec in specs:
        data = read_patches(spec, spec.val_path, tile_px)
        y = data.labels.astype(np.int64) if spec.kind != "regression" else data.labels.astype(np.float64)
        groups = None
        if spec.format == "hdf5":
            with open_hdf5(spec, spec.val_path) as handle:
                groups = handle["canvas"][...].astype(np.int64) if "canvas" in handle else None
        preds = {}
        for enc, folder in folders.items():
            pred, columns = head_predictions(str(folder), data.images, batch)
            preds[enc] = _task_outputs(pred, columns, spec.name, spec.kind)
        a = task_metric(spec.kind, y, preds[without_dense])
        b = task_metric(spec.kind, y, preds[with_dense])
        diffs = np.array([task_metric(spec.kind, y[idx], preds[with_dense][idx])
                          - task_metric(spec.kind, y[idx], preds[without_dense][idx])
                          for idx in bootstrap_indices(len(y), groups, n_boot, seed)])
        lo, hi = percentile_ci(diffs)
        lines.append(f"| {spec.name} | {_metric_short(spec.kind)} | {len(y)} | {a:.3f} | {b:.3f} | "
                     f"{b - a:+.3f} [{lo:+.3f}, {hi:+.3f}] | {loss_verdict(b - a, lo, hi)} |")
    return lines


def loss_verdict(diff: float, lo: float, hi: float, limit: float = PATCH_LOSS_LIMIT) -> str:
    """Whether a task lost at most `limit`, and whether the interval settles it."""
    if lo >= -limit:
        return "yes (CI excludes a larger loss)"
    if hi < -limit:
        return "no (CI excludes a smaller loss)"
    return ("yes" if diff >= -limit else "no") + " (CI spans the limit)"


def _metric_short(kind: str) -> str:
    return {"binary": "auc", "multiclass": "acc", "regression": "r2"}[kind]


def training_cost_lines(study: Path, encoders: list[str]) -> list[str]:
    """Markdown lines: each trained encoder's cost per epoch on this machine, from its history.json
    (the issue asks for the time per epoch with and without the dense tasks). Median over the epochs
    run, since the first epoch also pays for start-up and validation sizes differ between encoders."""
    rows = []
    for enc in encoders:
        path = study / "encoders" / enc / "history.json"
        if not path.is_file():
            continue
        history = [h for h in json.loads(path.read_text()) if h.get("seconds") is not None]
        if not history:
            continue
        seconds = sorted(float(h["seconds"]) for h in history)
        steps = sorted(int(h.get("steps") or 0) for h in history)
        mid_s, mid_steps = seconds[len(seconds) // 2], steps[len(steps) // 2]
        per_step = f"{mid_s / mid_steps:.2f}" if mid_steps else "n/a"
        rows.append(f"| {enc} | {len(history)} | {mid_steps} | {mid_s / 60:.2f} | {per_step} | "
                    f"{sum(seconds) / 60:.1f} |")
    if not rows:
        return []
    return ["", "Training cost on this machine (history.json of each encoder; steps and seconds are per epoch, "
            "median over the epochs run, training and validation included):", "",
            "| encoder | epochs | steps/worker | minutes/epoch | seconds/step | minutes in all |",
            "| --- | ---: | ---: | ---: | ---: | ---: |", *rows]


def _fmt(entry: dict | None) -> str:
    if not entry or entry.get("value") is None:
        return "n/a"
    text = f"{entry['value']:.3f}"
    if entry.get("ci_low") is not None and entry.get("ci_high") is not None:
        text += f" [{entry['ci_low']:.2f}, {entry['ci_high']:.2f}]"
    return text


# ------------------------------------------------------------------------------------------- main
def machine() -> str:
    import torch

    return (f"{os.cpu_count()} CPUs, {cpu_model()}, {ram_gib():.0f} GiB RAM, {platform.system()} {platform.release()}, "
            f"torch {torch.__version__}")


def write_results(table: str) -> None:
    """Put the table into encoders.md in place of its section (under its own heading when new)."""
    from collect_results import replace_section

    present = RESULTS.exists() and START in RESULTS.read_text()
    heading = "" if present else "## Transfer to a held-out task (linear probe on frozen embeddings)\n\n"
    replace_section(RESULTS, START, END, heading + table, "# Encoder benchmarks")
    print(f"wrote {RESULTS}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", type=Path, help="a nic pipeline run folder: its cohort, encoders and "
                        "slide-level results")
    parser.add_argument("--cohort", type=Path, help="cohort folder with heldout_tasks.yaml (default <study>/cohort)")
    parser.add_argument("--encoder", action="append", type=parse_encoder, default=None, metavar="NAME=PATH|BUILTIN",
                        help="an encoder to probe (repeatable; the first is the reference of the differences); "
                        "default: the study's, else random and mean-rgb")
    parser.add_argument("--task", default="apoptosis", help="the held-out task (default apoptosis)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="folds and bootstrap resamples")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads for embedding")
    parser.add_argument("--max-patches", type=int, default=None, help="a stratified subset of this many patches")
    parser.add_argument("--write", action="store_true", help="write the tables into benchmarks/results/encoders.md")
    args = parser.parse_args(argv)
    if args.study is None and args.cohort is None:
        parser.error("give --study or --cohort")
    cohort = args.cohort or args.study / "cohort"
    encoders = args.encoder or (study_encoders(args.study) if args.study else [EncoderRef(b, b) for b in BUILTINS])
    if not encoders:
        parser.error("no encoders to probe")

    import torch

    torch.set_num_threads(max(1, args.threads))
    wall0 = time.perf_counter()
    x, y, groups, spec = load_heldout(cohort, args.task, args.max_patches, args.seed)
    counts = np.bincount(y, minlength=len(spec.classes or []))
    n_groups = len(np.unique(groups)) if groups is not None else None
    print(f"[transfer] {args.task}: {len(y)} patches ({', '.join(f'{c} {n}' for c, n in zip(spec.classes, counts))}), "
          f"{n_groups if n_groups is not None else 'no'} canvases, {x.shape[1]} px", flush=True)
    resamples = bootstrap_indices(len(y), groups, args.bootstrap, args.seed)
    rows = []
    for enc in encoders:
        t0 = time.perf_counter()
        emb, info = embed(enc.ref, x, args.batch)
        t_embed = time.perf_counter() - t0
        if any(t.get("name") == args.task for t in info.tasks or []):
            raise SystemExit(f"{enc.name} ({enc.ref}) was trained on '{args.task}': it is not held out for it")
        t0 = time.perf_counter()
        result = linear_probe(emb, y, spec.kind, groups, args.folds, args.seed, resamples=resamples)
        t_probe = time.perf_counter() - t0
        rows.append((enc, info, result, t_embed, t_probe))
        print(f"[transfer] {enc.name:14s} C={info.embedding_dim:4d} {result.metric} {result.value:.3f} "
              f"[{result.ci_low:.3f}, {result.ci_high:.3f}]  embed {t_embed:.1f} s, probe {t_probe:.1f} s", flush=True)

    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/bench_transfer.py",
                                                *(sys.argv[1:] if argv is None else argv)])
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    metric = "ROC AUC" if spec.kind == "binary" else "balanced accuracy"
    ref = rows[0]
    lines = [
        START,
        f"Command: `{command}`",
        "",
        f"Machine: {machine()}; torch threads {args.threads}; load average at the end {load}; "
        f"{time.perf_counter() - wall0:.0f} s in all.",
        f"Task: `{args.task}` from `{cohort}/{HELDOUT_YAML}` ({spec.kind}; train + val, {len(y)} patches: "
        f"{', '.join(f'{c} {n}' for c, n in zip(spec.classes, counts))}; "
        f"{f'{n_groups} canvases' if n_groups is not None else 'no canvas ids'}). Probe: standardised embedding, "
        f"L2 logistic regression, C from {CS[0]:g}..{CS[-1]:g} by inner 3-fold CV; {args.folds}-fold "
        f"{'grouped (by canvas) ' if groups is not None else ''}stratified CV, seed {args.seed}; "
        f"{metric} of the out-of-fold predictions{' (pairs within a fold)' if spec.kind == 'binary' else ''}, "
        "95 % bootstrap CI over "
        f"{'canvases' if groups is not None else 'patches'} ({args.bootstrap} resamples); "
        f"difference to `{ref[0].name}` paired over the same resamples.",
        "",
        f"| encoder | what | C | {metric} [95 % CI] | minus {ref[0].name} [95 % CI] | C chosen per fold | embed s | probe s |",
        "| --- | --- | ---: | --- | --- | --- | ---: | ---: |",
    ]
    for enc, info, result, t_embed, t_probe in rows:
        diff, lo, hi = paired_difference(result, ref[2])
        diff_text = "(reference)" if enc is ref[0] else f"{diff:+.3f} [{lo:+.3f}, {hi:+.3f}]"
        chosen = ", ".join(f"{c:g}" for c in result.chosen_c)
        lines.append(f"| {enc.name} | {describe(info)} | {info.embedding_dim} | {result.value:.3f} "
                     f"[{result.ci_low:.3f}, {result.ci_high:.3f}] | {diff_text} | {chosen} | {t_embed:.1f} | {t_probe:.1f} |")
    if args.study is not None:
        header, slide_rows = slide_level_rows(args.study, [e.name for e in encoders])
        if slide_rows and len(header) > 1:
            lines += ["", f"Slide level, the same encoders in the study `{args.study}` (out-of-fold metric "
                      "[bootstrap 95 % CI] of the slide-level CNN; probe = the slide-level linear probe on the "
                      "same folds; from models/<encoder>/<target>/metrics.json):", "",
                      "| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
            lines += ["| " + " | ".join(r) + " |" for r in slide_rows]
    if args.study is not None:
        lines += encoder_metric_lines(args.study, [e.name for e in encoders])
        lines += patch_task_comparison(args.study, seed=args.seed)
        lines += training_cost_lines(args.study, [e.name for e in encoders])
    lines.append(END)
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_results(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
