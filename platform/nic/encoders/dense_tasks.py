"""Dense tasks inside the multitask objective: decoders, masked loss, validation columns, metrics.

Kept apart from nic.encoders.objectives so the patch-task path there stays as it was: the MTL
objective calls in here only when a task is dense. Same contract as the patch heads: each sample
carries the target of its own task only, so each decoder runs on its own task's rows of the batch;
a task absent from a batch contributes nothing and its decoder is not in the graph (no gradient
at all: its parameters' .grad stays None, or zero under DDP).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nic.encoders.decoders import DenseDecoder
from nic.encoders.dense_loss import IGNORE, dense_loss
from nic.encoders.dense_metrics import (
    count_instances,
    dice_parts,
    instances_from_classes,
    match_instances,
    mean_dice,
    panoptic_quality,
    pearson_r,
)

if TYPE_CHECKING:
    from nic.encoders.objectives import TaskHeadSpec

DENSE_KINDS = ("segmentation", "nuclei")


def is_dense(spec: TaskHeadSpec) -> bool:
    return spec.kind in DENSE_KINDS


def typed(spec: TaskHeadSpec) -> bool:
    return spec.kind == "nuclei" and bool(spec.classes)


def scored_classes(spec: TaskHeadSpec) -> int:
    """Columns of a task's Dice parts: its classes (segmentation) or one, the nucleus foreground."""
    return len(spec.classes or []) if spec.kind == "segmentation" else 1


def build_decoders(specs: list[TaskHeadSpec], map_channels: list[int]) -> nn.ModuleDict:
    return nn.ModuleDict({s.name: DenseDecoder(map_channels, s.num_outputs) for s in specs if is_dense(s)})


def masked_dense_loss(maps: list[torch.Tensor], decoders: nn.ModuleDict, specs: list[TaskHeadSpec],
                      task_ids: torch.Tensor, targets: torch.Tensor, tile_px: int
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum over the dense tasks present in the batch of weight x mean per-sample loss."""
    total = maps[-1].new_zeros(())
    parts: dict[str, torch.Tensor] = {}
    for k, spec in enumerate(specs):
        if not is_dense(spec):
            continue
        mask = task_ids == k
        if not bool(mask.any()):
            continue
        logits = decoders[spec.name]([m[mask] for m in maps])  # at the decoder's own (half) resolution
        loss = dense_loss(spec.kind, logits, targets[mask], typed(spec)).mean()
        parts[spec.name] = loss.detach()
        total = total + spec.weight * loss
    return total, parts


def validation_columns(maps: list[torch.Tensor], decoders: nn.ModuleDict, specs: list[TaskHeadSpec],
                       task_ids: torch.Tensor, targets: torch.Tensor, tile_px: int,
                       loss: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-sample Dice parts, instance-matching parts and counts (zeros for other tasks' samples);
    writes each dense sample's loss into `loss`."""
    n = len(task_ids)
    width = max(scored_classes(s) for s in specs if is_dense(s))
    dice = np.zeros((n, 3, width))
    pq = np.zeros((n, 4))
    counts = np.zeros((n, 2))
    for k, spec in enumerate(specs):
        if not is_dense(spec):
            continue
        mask = task_ids == k
        if not bool(mask.any()):
            continue
        rows = torch.nonzero(mask)[:, 0].cpu().numpy()
        low = decoders[spec.name]([m[mask] for m in maps])
        t = targets[mask]
        loss[mask] = dense_loss(spec.kind, low, t, typed(spec))  # as in training
        logits = F.interpolate(low, size=(tile_px, tile_px), mode="bilinear", align_corners=False)
        truth = t[:, 0].long().cpu().numpy()
        if spec.kind == "segmentation":
            pred = logits.argmax(1).cpu().numpy()
            for i, r in enumerate(rows):
                dice[r, :, : scored_classes(spec)] = dice_parts(pred[i], truth[i], scored_classes(spec))
            continue
        classes = logits[:, :3].argmax(1).cpu().numpy()
        for i, r in enumerate(rows):
            inst = instances_from_classes(classes[i])
            valid = truth[i] != IGNORE
            dice[r, :, :1] = dice_parts((inst > 0).astype(np.int64), (truth[i] > 0).astype(np.int64), 2,
                                        valid)[:, 1:2]
            pq[r] = match_instances(inst, np.where(valid, truth[i], 0))
            counts[r] = (count_instances(inst), count_instances(np.where(valid, truth[i], 0)))
    return {"dense_dice": dice, "dense_pq": pq, "dense_count": counts}


def dense_metrics(specs: list[TaskHeadSpec], columns: dict[str, np.ndarray]) -> dict[str, float]:
    """`<task>/loss` and `<task>/dice` per dense task; nuclei also `<task>/pq` and `<task>/count_r`."""
    metrics: dict[str, float] = {}
    for k, spec in enumerate(specs):
        if not is_dense(spec):
            continue
        mask = columns["task"] == k
        if not mask.any():
            continue
        metrics[f"{spec.name}/loss"] = float(np.mean(columns["loss"][mask]))
        parts = columns["dense_dice"][mask].sum(0)
        if spec.kind == "segmentation":
            fg = [c for c in range(scored_classes(spec)) if c != spec.background]
            metrics[f"{spec.name}/dice"] = mean_dice(parts, fg)
        else:
            metrics[f"{spec.name}/dice"] = mean_dice(parts, [0])
            metrics[f"{spec.name}/pq"] = panoptic_quality(*columns["dense_pq"][mask].sum(0))
            count = columns["dense_count"][mask]
            metrics[f"{spec.name}/count_r"] = pearson_r(count[:, 0], count[:, 1])
    return metrics
