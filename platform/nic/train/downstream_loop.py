"""The Ray Train loop of one cross-validation fold of a slide-level model.

One fold is one TorchTrainer run (Train V2): DDP workers each draw their share of the epoch's random
crops (crops_per_slide per training slide), validate on centred crops of the fold's validation
slides, reduce the learning rate x10 on plateau, stop early, and report a checkpoint every epoch.
The checkpoint holds the last state (to resume) *and* the best weights so far (to evaluate), so
keeping only the latest checkpoint is enough and a resumed run still ends with the best model.
Re-running with the same storage path and run name resumes from the latest checkpoint: Ray Train
V2 restores it from the run's snapshot.

A single-worker fold can also run without Ray Train, on a FoldRunner (a long-lived actor that
trains fold after fold): the same loop, as rank 0 of 1, with its checkpoints in a CheckpointStore
beside where Train would keep them.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torch.utils.data import DataLoader

from nic.artifacts import write_parquet_atomic
from nic.downstream.dataset import EpochSampler, GridDataset, balanced_weights
from nic.downstream.evaluate import outputs_to_prediction, predict_slides, prediction_columns
from nic.downstream.losses import loss_for
from nic.downstream.metrics import PRIMARY_METRIC, compute_metrics
from nic.downstream.models import build_model, save_model
from nic.storage import ray_storage
from nic.train.common import (
    CheckpointStore,
    EarlyStopping,
    Stopwatch,
    TrainSession,
    broadcast_buffers,
    checkpoint_dir,
    configure_train_polling,
    cpu_copy,
    epoch_line,
    gather_columns,
    load_checkpoint,
    load_state_dicts,
    mean_over_workers,
    report_epoch,
    resolve_device,
    save_checkpoint,
    send_progress,
    state_dicts,
    unwrap_model,
)
from nic.train.determinism import make_deterministic

STAGE = "train-downstream"
STATE_FILE = "state.pt"
PREDICTIONS_FILE = "predictions.parquet"
MODEL_FILE = "model.pt"


@dataclass
class FoldSpec:
    """Everything a fold's workers need; plain data so Ray ships it to any node."""

    fold: int
    grids: str
    kind: str
    model: str
    in_channels: int
    outputs: int
    crop_size: int
    train_ids: list[str]
    train_targets: dict[str, list]
    val_ids: list[str] = field(default_factory=list)
    val_targets: dict[str, list] = field(default_factory=dict)
    pool: str | None = None  # None: the model's own pooling (nic.downstream.models.MODEL_POOL)
    strided: int | None = None  # nic-cnn: stride-2 layers (None: the paper's 6)
    epochs: int = 100
    crops_per_slide: int = 8  # random crops of each training slide per epoch
    batch_size: int = 16
    lr: float = 1e-2
    min_lr: float = 1e-5
    lr_patience: int = 5
    patience: int = 15
    l2: float = 1e-5
    dropout: float = 0.2
    dihedral: bool = True
    balanced: bool = False
    ties: str = "efron"
    target_mean: float = 0.0
    target_std: float = 1.0
    seed: int = 0
    cache_grids: int = 64
    loader_workers: int = 0
    # Evaluation of the best model at the end of training (held-out fold and test slides).
    eval_ids: list[str] = field(default_factory=list)
    eval_splits: list[str] = field(default_factory=list)  # "cv" or "test", one per eval id
    tta_crops: int = 10
    classes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _targets(spec_targets: dict[str, list], kind: str, mean: float, std: float) -> dict[str, np.ndarray]:
    """Tensors-to-be of the targets; regression targets standardised so lr 1e-2 suits any unit."""
    out = {name: np.asarray(values) for name, values in spec_targets.items()}
    if kind == "regression":
        out["target"] = ((out["target"].astype(np.float64) - mean) / std).astype(np.float32)
    elif kind in ("binary", "multiclass"):
        out["target"] = out["target"].astype(np.int64)
    else:
        out["time"] = out["time"].astype(np.float32)
        out["event"] = out["event"].astype(np.float32)
    return out


def _validate(model, dataset: GridDataset, loss_fn, spec: FoldSpec, device, rank: int, world: int) -> dict:
    """Loss and primary metric on centred crops of every validation slide (sharded over ranks,
    gathered, so the Cox loss sees the whole validation set's risk sets and every rank agrees)."""
    model.eval()
    outs: list[np.ndarray] = []
    idxs: list[int] = []
    with torch.no_grad():
        mine = list(range(rank, len(dataset), world))
        for start in range(0, len(mine), spec.batch_size):
            items = [dataset[i] for i in mine[start:start + spec.batch_size]]
            grid = torch.stack([it["grid"] for it in items]).to(device)
            mask = torch.stack([it["mask"] for it in items]).to(device)
            outs.append(model(grid, mask).float().cpu().numpy())
            idxs.extend(it["index"] for it in items)
    local = {"out": np.concatenate(outs) if outs else np.zeros((0, spec.outputs), dtype=np.float32),
             "index": np.asarray(idxs, dtype=np.int64)}
    gathered = gather_columns(local)
    order = np.argsort(gathered["index"], kind="stable")
    out = torch.from_numpy(gathered["out"][order])
    index = gathered["index"][order]
    batch = {name: torch.as_tensor(values[index]) for name, values in dataset.targets.items()}
    loss = float(loss_fn(out, batch))
    pred = outputs_to_prediction(spec.kind, out, spec.target_mean, spec.target_std)
    primary = PRIMARY_METRIC[spec.kind]
    if spec.kind == "survival":
        metrics = compute_metrics("survival", time=batch["time"].numpy(), event=batch["event"].numpy(),
                                  prediction=pred, n_bootstrap=0)
    else:
        target = batch["target"].numpy()
        if spec.kind == "regression":
            target = target * spec.target_std + spec.target_mean
        metrics = compute_metrics(spec.kind, target=target, prediction=pred, n_bootstrap=0)
    value = metrics[primary]["value"]
    return {"val_loss": loss, f"val_{primary}": math.nan if value is None else value}


def _build(spec: FoldSpec) -> torch.nn.Module:
    """The fold's model: its pooling, and for the CNN its number of stride-2 layers."""
    extra = {"strided": spec.strided} if spec.model == "nic-cnn" and spec.strided is not None else {}
    return build_model(spec.model, spec.in_channels, spec.outputs, dropout=spec.dropout,  # type: ignore[arg-type]
                       pool=spec.pool, **extra)  # type: ignore[arg-type]


class _StoreSession:
    """The fold loop's session (nic.train.common.TrainSession inside Ray Train) for a fold trained
    in a process of its own (FoldRunner): rank 0 of 1, the device of the process's reservation,
    checkpoints in a CheckpointStore (`scratch`: where the latest one is fetched to resume from)."""

    rank, world = 0, 1

    def __init__(self, store: CheckpointStore, use_gpu: bool, scratch: Path) -> None:
        self.store, self.scratch = store, scratch
        self._device = resolve_device(use_gpu)

    def device(self) -> torch.device:
        return self._device

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self._device)

    def checkpoint(self) -> Path | None:
        return self.scratch if self.store.fetch(self.scratch) else None

    def report(self, metrics: dict, folder: Path | None = None) -> None:
        if folder is not None:
            self.store.save(folder)


def train_fold(config: dict) -> None:
    """train_loop_per_worker of a fold's TorchTrainer (config = FoldSpec.to_dict() + 'progress')."""
    _fold_loop(config, TrainSession())


def _fold_loop(config: dict, session: TrainSession | _StoreSession) -> None:
    """One fold from its last checkpoint (if any) to its evaluated best model: the same steps, in
    the same order, for a Ray Train worker and for a FoldRunner."""
    config = dict(config)
    progress = config.pop("progress", None)
    fold = _Fold(FoldSpec(**config), session, progress)
    fold.resume()
    fold.open_data()
    while fold.epoch < fold.spec.epochs and not fold.stopper.should_stop:
        fold.train_epoch()
    if not fold.evaluated:
        fold.evaluate()


class _Fold:
    """The state of one fold's training and its steps, one method each, called by `_fold_loop` in
    a fixed order. The order matters beyond readability: the model's initialisation, the data
    loader and the checkpointed torch RNG state all draw from torch's global generator, so the
    same steps in the same order are what makes a fold repeat bit for bit (and a resumed fold
    continue as an uninterrupted one would)."""

    def __init__(self, spec: FoldSpec, session: TrainSession | _StoreSession, progress: Any) -> None:
        """Seed, fix the kernels, build the model and what trains it: everything a checkpoint
        restores into."""
        self.spec, self.session, self.progress = spec, session, progress
        self.rank, self.world = session.rank, session.world
        torch.manual_seed(spec.seed * 1000 + self.rank)
        self.device = session.device()
        # Same fold, same machine, same predictions: a fixed thread count (the CPUs this worker or
        # FoldRunner reserved) and deterministic kernels (nic.train.determinism).
        make_deterministic(None, self.device)

        self.model = session.prepare(_build(spec))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=spec.lr, weight_decay=spec.l2)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=0.1, patience=spec.lr_patience, min_lr=spec.min_lr)
        self.stopper = EarlyStopping(spec.patience, mode="min", min_delta=1e-6)
        self.loss_fn = loss_for(spec.kind, ties=spec.ties)  # type: ignore[arg-type]
        self.epoch = 0
        self.best_state: dict | None = None
        self.history: list[dict] = []
        self.evaluated = False

    def _stateful(self) -> dict[str, Any]:
        """What a checkpoint saves the state_dict of, under these names."""
        return {"model": unwrap_model(self.model), "optimizer": self.optimizer, "scheduler": self.scheduler,
                "early_stopping": self.stopper}

    def resume(self) -> None:
        """Continue from the latest checkpoint, if the runner has one: weights, optimiser, schedule,
        patience, history and the torch RNG state, so the next epoch draws what it would have."""
        checkpoint = self.session.checkpoint()
        if checkpoint is None:
            return
        saved = load_checkpoint(checkpoint, STATE_FILE)
        load_state_dicts(self._stateful(), saved)
        self.epoch, self.best_state, self.history = saved["epoch"], saved["best_state"], saved["history"]
        self.evaluated = bool(saved.get("evaluated"))
        torch.set_rng_state(saved["torch_rng"])
        if self.rank == 0:
            send_progress(self.progress, f"[{STAGE}] fold {self.spec.fold}: resuming after epoch {self.epoch}")

    def snapshot(self, done: bool) -> dict:
        """Everything needed to resume: last state, best weights so far, history; done = evaluated."""
        return {**state_dicts(self._stateful()), "epoch": self.epoch, "best_state": self.best_state,
                "history": self.history, "torch_rng": torch.get_rng_state(), "evaluated": done}

    def open_data(self) -> None:
        """The fold's training crops (this rank's share of each epoch's seeded draw, optionally
        class-balanced) and its validation slides."""
        spec = self.spec
        train_targets = _targets(spec.train_targets, spec.kind, spec.target_mean, spec.target_std)
        train_ds = GridDataset(spec.grids, spec.train_ids, train_targets, spec.crop_size, train=True,
                               augment=spec.dihedral, cache_size=spec.cache_grids)
        self.val_ds = None
        if spec.val_ids:
            self.val_ds = GridDataset(spec.grids, spec.val_ids, _targets(spec.val_targets, spec.kind, spec.target_mean,
                                      spec.target_std), spec.crop_size, train=False, cache_size=spec.cache_grids)
        weights = (balanced_weights(train_targets["target"])
                   if spec.balanced and spec.kind in ("binary", "multiclass") else None)
        self.sampler = EpochSampler(len(train_ds), rank=self.rank, world_size=self.world, seed=spec.seed,
                                    weights=weights, repeats=spec.crops_per_slide)
        self.loader = DataLoader(train_ds, batch_size=spec.batch_size, sampler=self.sampler,
                                 num_workers=spec.loader_workers)

    def train_epoch(self) -> None:
        """One epoch: the training steps, validation (or the training loss when the fold has no
        validation slides) as the monitored value, the LR schedule and patience, then the report."""
        clock = Stopwatch()
        self.sampler.set_epoch(self.epoch)
        train_loss = self._train_steps()
        broadcast_buffers(unwrap_model(self.model))  # every rank validates and saves rank 0's BatchNorm statistics
        metrics: dict[str, Any] = {"train_loss": mean_over_workers({"loss": train_loss})["loss"]}
        if self.val_ds is not None:
            metrics.update(_validate(self.model, self.val_ds, self.loss_fn, self.spec, self.device, self.rank,
                                     self.world))
            monitored = metrics["val_loss"]
        else:
            monitored = metrics["train_loss"]
        self.scheduler.step(monitored)
        self.epoch += 1
        self.evaluated = False  # a resumed run that trains on must evaluate its new best model
        if self.stopper.update(monitored, self.epoch):
            self.best_state = cpu_copy(unwrap_model(self.model).state_dict())
        metrics.update(lr=self.optimizer.param_groups[0]["lr"], seconds=round(clock.seconds(), 2))
        self._report(metrics)

    def _train_steps(self) -> float:
        """One pass over this rank's crops of the epoch; returns the mean training loss per slide."""
        self.model.train()
        total, count = 0.0, 0
        for batch in self.loader:
            if batch["grid"].shape[0] < 2:  # BatchNorm cannot normalise a single 1x1 map
                continue
            grid = batch["grid"].to(self.device)
            mask = batch["mask"].to(self.device)
            out = self.model(grid, mask)
            loss = self.loss_fn(out, {k: v.to(self.device) for k, v in batch.items() if k not in ("grid", "mask")})
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += float(loss.detach()) * grid.shape[0]
            count += grid.shape[0]
        return total / max(count, 1)

    def _report(self, metrics: dict[str, Any]) -> None:
        """Record the epoch in the history and report it (rank 0: with its progress line and a
        checkpoint)."""
        spec, stopper = self.spec, self.stopper
        record = {"fold": spec.fold, "epoch": self.epoch, **metrics, "best_epoch": stopper.best_epoch,
                  "best_loss": stopper.best, "stopped": stopper.should_stop}
        self.history.append(record)
        shown = {k: v for k, v in metrics.items() if k != "seconds"}
        note = "early stop" if stopper.should_stop else ("best" if stopper.best_epoch == self.epoch else "")
        line = epoch_line(f"{STAGE} fold {spec.fold}", self.epoch, spec.epochs, shown, metrics["seconds"], note)
        report_epoch(self.session, record, self.progress, line, lambda: self.snapshot(False), STATE_FILE)

    def evaluate(self) -> None:
        """Evaluate the best model once, on rank 0 (within this fold's reserved resources), and
        report it as the final checkpoint so the driver gets predictions and weights from Ray's
        storage; the other ranks only report that the fold is done."""
        spec = self.spec
        final: dict[str, Any] = {"fold": spec.fold, "epoch": self.epoch, "evaluated": True}
        if self.rank != 0:
            self.session.report(final)
            return
        clock = Stopwatch()
        best = _build(spec)
        best.load_state_dict(self.best_state if self.best_state is not None
                             else unwrap_model(self.model).state_dict())
        best.to(self.device).eval()
        with checkpoint_dir() as folder:
            folder = Path(folder)
            self._write_evaluation(folder, best)
            save_checkpoint(folder, self.snapshot(True), STATE_FILE)
            final["eval_seconds"] = round(clock.seconds(), 2)
            send_progress(self.progress, f"[{STAGE} fold {spec.fold}] evaluated {len(spec.eval_ids)} slides x "
                          f"{spec.tta_crops * (8 if spec.dihedral else 1)} views ({final['eval_seconds']:.1f} s)")
            self.session.report(final, folder)

    def _write_evaluation(self, folder: Path, best: torch.nn.Module) -> None:
        """The fold's model.pt and the predictions of its held-out and test slides, into the final
        checkpoint's folder."""
        spec = self.spec
        save_model(folder / MODEL_FILE, best, {
            "model": spec.model, "in_channels": spec.in_channels, "outputs": spec.outputs, "kind": spec.kind,
            "dropout": spec.dropout, "crop_size": spec.crop_size, "target_mean": spec.target_mean,
            "target_std": spec.target_std, "classes": spec.classes, "fold": spec.fold,
            "best_epoch": self.stopper.best_epoch,
        })
        pred = predict_slides(best, spec.grids, spec.eval_ids, spec.kind, spec.crop_size, spec.tta_crops,
                              spec.dihedral, spec.seed, self.device, spec.target_mean, spec.target_std)
        frame = pd.DataFrame({"slide_id": spec.eval_ids, "split": spec.eval_splits, "fold": spec.fold,
                              **prediction_columns(spec.kind, pred, spec.classes)})
        write_parquet_atomic(folder / PREDICTIONS_FILE, pa.Table.from_pandas(frame, preserve_index=False))


def read_fold_result(checkpoint) -> dict:
    """What a finished fold's final checkpoint (a `ray.train.Checkpoint` or a folder) holds: 'state'
    (history, epoch, early_stopping...), 'predictions' (DataFrame of the held-out and test slides)
    and 'model' (the bytes of model.pt)."""
    opened = checkpoint.as_directory() if hasattr(checkpoint, "as_directory") else contextlib.nullcontext(checkpoint)
    with opened as folder:
        folder = Path(folder)
        state = load_checkpoint(folder, STATE_FILE)
        if not state.get("evaluated") or not (folder / PREDICTIONS_FILE).exists():
            raise RuntimeError("the fold's last checkpoint has no evaluation (training did not finish)")
        return {"state": state, "predictions": pd.read_parquet(folder / PREDICTIONS_FILE),
                "model": (folder / MODEL_FILE).read_bytes()}


class FoldRunner:
    """Trains single-worker folds one after another in one process: `nic train-downstream` makes it
    a Ray actor that reserves one worker's CPUs (and GPU) and lends it to one fold at a time, so the
    process, torch and its imports start once for all the folds it trains instead of once per fold
    as a Ray Train run does (controller, worker group, process group: ~10 s a fold on 2 CPUs).

    The loop is the Train worker's own (`_fold_loop`) as rank 0 of 1, which is what a one-worker
    TorchTrainer runs too (no DDP wrapper), so a fold learns and predicts the same for the same
    seed. Its checkpoint is a CheckpointStore at `<storage>/<name>/nic_checkpoint/` (`storage`: a
    local path or URI, as `nic.storage.ray_storage` gives it), saved every epoch like Train's: a
    re-run resumes the fold from its last epoch, or only reads its result once evaluated."""

    def __init__(self, use_gpu: bool = False) -> None:
        self.use_gpu = use_gpu

    def run(self, spec: dict, storage: str, name: str, progress: Any = None) -> dict:
        """Train (or resume) and evaluate one fold; returns what `read_fold_result` returns."""
        store = CheckpointStore(storage, name, STATE_FILE)
        with tempfile.TemporaryDirectory(prefix="nic-fold-") as scratch:
            _fold_loop({**spec, "progress": progress}, _StoreSession(store, self.use_gpu, Path(scratch) / "resume"))
            if not store.fetch(Path(scratch) / "result"):
                raise RuntimeError("training reported no checkpoint")
            return read_fold_result(Path(scratch) / "result")


def fit_fold(
    spec: FoldSpec,
    storage_path: str | Path,
    name: str,
    num_workers: int = 1,
    use_gpu: bool = False,
    cpus_per_worker: float = 1.0,
    max_failures: int = 2,
    progress: Any = None,
    resource_timeout_s: float = 300.0,
):
    """Run (or resume) one fold's TorchTrainer; returns the Ray Train Result. `progress` is a
    ProgressRelay queue (nic.train.common) that rank 0's epoch lines go to, or None to print them."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    from nic.train.trainer import OwnedTorchTrainer, controller_failure_limit, wait_for_resources

    configure_train_polling()
    resources = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    wait_for_resources(num_workers, resources, resource_timeout_s, f"train-downstream fold {spec.fold} ({name})")
    trainer = OwnedTorchTrainer(
        train_fold,
        train_loop_config={**spec.to_dict(), "progress": progress},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=ray_storage(storage_path),
            # Ray Train v2's FailureConfig: ray.train exports v2 at run time, mypy reads v1's
            failure_config=FailureConfig(max_failures=max_failures,  # type: ignore[call-arg]
                                         controller_failure_limit=controller_failure_limit(resource_timeout_s)),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
    )
    return trainer.fit()
