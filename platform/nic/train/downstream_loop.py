"""The Ray Train loop of one cross-validation fold of a slide-level model.

One fold is one TorchTrainer run (Train V2): DDP workers each draw their share of random crops per
epoch, validate on centred crops of the fold's validation slides, reduce the learning rate x10 on
plateau, stop early, and report a checkpoint every epoch. The checkpoint holds the last state (to
resume) *and* the best weights so far (to evaluate), so keeping only the latest checkpoint is
enough and a resumed run still ends with the best model. Re-running with the same storage path and
run name resumes from the latest checkpoint: Ray Train V2 restores it from the run's snapshot.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from nic.downstream.dataset import EpochSampler, GridDataset, balanced_weights
from nic.downstream.evaluate import outputs_to_prediction
from nic.downstream.losses import loss_for
from nic.downstream.metrics import PRIMARY_METRIC, compute_metrics
from nic.downstream.models import build_model

STATE_FILE = "state.pt"


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
    epochs: int = 100
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
    cache_grids: int = 8
    loader_workers: int = 0

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


def _gather(obj: Any, world: int) -> list:
    if world == 1:
        return [obj]
    import torch.distributed as dist

    gathered: list = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered


def _validate(model, dataset: GridDataset, loss_fn, spec: FoldSpec, device, rank: int, world: int) -> dict:
    """Loss and primary metric on centred crops of every validation slide (sharded over ranks,
    gathered, so the Cox loss sees the whole validation set's risk sets)."""
    model.eval()
    outs, idxs = [], []
    with torch.no_grad():
        for start in range(rank, len(dataset), world * spec.batch_size):
            items = [dataset[i] for i in range(start, min(len(dataset), start + world * spec.batch_size), world)]
            grid = torch.stack([it["grid"] for it in items]).to(device)
            mask = torch.stack([it["mask"] for it in items]).to(device)
            outs.append(model(grid, mask).cpu())
            idxs.extend(it["index"] for it in items)
    local = (torch.cat(outs) if outs else torch.zeros((0, spec.outputs)), idxs)
    parts = _gather(local, world)
    out = torch.cat([p[0] for p in parts])
    index = np.concatenate([np.asarray(p[1], dtype=int) for p in parts])
    order = np.argsort(index, kind="stable")
    out, index = out[order], index[order]
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


def train_fold(config: dict) -> None:
    """train_loop_per_worker of a fold's TorchTrainer (config = FoldSpec.to_dict())."""
    import ray.train
    import ray.train.torch

    spec = FoldSpec(**config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(spec.seed * 1000 + rank)
    device = ray.train.torch.get_device()

    model = build_model(spec.model, spec.in_channels, spec.outputs, dropout=spec.dropout)
    model = ray.train.torch.prepare_model(model)
    module = model.module if hasattr(model, "module") else model
    optimizer = torch.optim.Adam(model.parameters(), lr=spec.lr, weight_decay=spec.l2)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=0.1, patience=spec.lr_patience, min_lr=spec.min_lr)
    loss_fn = loss_for(spec.kind, ties=spec.ties)  # type: ignore[arg-type]
    state = {"epoch": 0, "best_loss": math.inf, "best_epoch": -1, "bad_epochs": 0, "stopped": False,
             "best_state": None, "history": []}

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            saved = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False)
        module.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = saved["state"]
        torch.set_rng_state(saved["torch_rng"])

    train_targets = _targets(spec.train_targets, spec.kind, spec.target_mean, spec.target_std)
    train_ds = GridDataset(spec.grids, spec.train_ids, train_targets, spec.crop_size, train=True,
                           augment=spec.dihedral, cache_size=spec.cache_grids)
    val_ds = None
    if spec.val_ids:
        val_ds = GridDataset(spec.grids, spec.val_ids, _targets(spec.val_targets, spec.kind, spec.target_mean,
                             spec.target_std), spec.crop_size, train=False, cache_size=spec.cache_grids)
    weights = balanced_weights(train_targets["target"]) if spec.balanced and spec.kind in ("binary", "multiclass") else None
    sampler = EpochSampler(len(train_ds), rank=rank, world_size=world, seed=spec.seed, weights=weights)
    loader = DataLoader(train_ds, batch_size=spec.batch_size, sampler=sampler, num_workers=spec.loader_workers)

    while state["epoch"] < spec.epochs and not state["stopped"]:
        epoch = state["epoch"]
        sampler.set_epoch(epoch)
        model.train()
        total, count = 0.0, 0
        for batch in loader:
            if batch["grid"].shape[0] < 2:  # BatchNorm cannot normalise a single 1x1 map
                continue
            grid = batch["grid"].to(device)
            mask = batch["mask"].to(device)
            out = model(grid, mask)
            loss = loss_fn(out, {k: v.to(device) for k, v in batch.items() if k not in ("grid", "mask")})
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * grid.shape[0]
            count += grid.shape[0]
        train_loss = total / max(count, 1)
        metrics: dict[str, Any] = {"fold": spec.fold, "epoch": epoch + 1, "train_loss": train_loss}
        if val_ds is not None:
            metrics.update(_validate(model, val_ds, loss_fn, spec, device, rank, world))
            monitored = metrics["val_loss"]
        else:
            monitored = train_loss
        scheduler.step(monitored)
        if monitored < state["best_loss"] - 1e-6:
            state.update(best_loss=monitored, best_epoch=epoch + 1, bad_epochs=0,
                         best_state={k: v.detach().cpu().clone() for k, v in module.state_dict().items()})
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1
        state["stopped"] = state["bad_epochs"] >= spec.patience
        metrics.update(lr=optimizer.param_groups[0]["lr"], best_epoch=state["best_epoch"],
                       best_loss=state["best_loss"], stopped=state["stopped"])
        state["history"].append(dict(metrics))
        _report(metrics, rank, module, optimizer, scheduler, state)


def _report(metrics: dict, rank: int, module, optimizer, scheduler, state: dict) -> None:
    """Every rank reports; rank 0 attaches the checkpoint (last state + best weights)."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="nic-ckpt-") as folder:
        torch.save({"model": module.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "state": state, "torch_rng": torch.get_rng_state()},
                   Path(folder) / STATE_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def read_checkpoint(checkpoint) -> dict:
    """The saved state of a fold's checkpoint: best weights ('best_state'), 'history', 'best_epoch'..."""
    with checkpoint.as_directory() as folder:
        saved = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False)
    state = saved["state"]
    if state.get("best_state") is None:
        state["best_state"] = saved["model"]
    return state


def fit_fold(
    spec: FoldSpec,
    storage_path: str | Path,
    name: str,
    num_workers: int = 1,
    use_gpu: bool = False,
    cpus_per_worker: float = 1.0,
    max_failures: int = 2,
):
    """Run (or resume) one fold's TorchTrainer; returns the Ray Train Result."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_fold,
        train_loop_config=spec.to_dict(),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=str(Path(storage_path).resolve()),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
    )
    return trainer.fit()
