"""Training targets and losses of dense tasks: Dice + cross-entropy, per sample.

Targets arrive as (n, 2, P, P) integer maps after augmentation (channel 0: class or nucleus
instance id, channel 1: nucleus type; -1 = ignore). The nuclei target that separates touching
nuclei is a boundary class, derived here from the instance map *after* the geometric
augmentation, so rotation, flips and crops never have to transform it:

    0 background, 1 nucleus interior, 2 nucleus boundary (a nucleus pixel whose 3 x 3
    neighbourhood holds another id, another nucleus or background).

Each map (segmentation classes; nuclei background/interior/boundary; nucleus types) costs
cross-entropy (mean over labelled pixels) + soft Dice loss (1 - mean over classes of the soft
Dice, with +1 smoothing so a class absent from a tile teaches "predict none of it"). Both are per
sample, so the loss of a task is the mean over its own samples, like the patch tasks'.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -1
INTERIOR, BOUNDARY = 1, 2


def nucleus_classes(instances: torch.Tensor) -> torch.Tensor:
    """(n, P, P) instance ids (-1 ignore) -> background 0 / interior 1 / boundary 2 (-1 kept)."""
    inst = instances.float()[:, None]
    high = F.max_pool2d(inst, 3, stride=1, padding=1)
    low = -F.max_pool2d(-inst, 3, stride=1, padding=1)
    edge = (high != inst) | (low != inst)
    fg = inst > 0
    out = torch.where(fg, torch.where(edge, BOUNDARY, INTERIOR), torch.zeros_like(inst, dtype=torch.long))
    out = torch.where(inst < 0, IGNORE, out)
    return out[:, 0].long()


def ce_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy + soft Dice loss; target (n, P, P) long with -1 = ignore."""
    valid = target != IGNORE
    ce = F.cross_entropy(logits, target.clamp_min(0), reduction="none") * valid
    counts = valid.flatten(1).sum(1).clamp_min(1)
    ce = ce.flatten(1).sum(1) / counts
    probs = torch.softmax(logits, dim=1) * valid[:, None]
    onehot = F.one_hot(target.clamp_min(0), logits.shape[1]).permute(0, 3, 1, 2).float() * valid[:, None]
    inter = (probs * onehot).flatten(2).sum(2)
    denom = probs.flatten(2).sum(2) + onehot.flatten(2).sum(2)
    dice = (2 * inter + 1) / (denom + 1)
    return ce + (1 - dice.mean(1))


def at_size(targets: torch.Tensor, size: int) -> torch.Tensor:
    """Integer target maps subsampled (nearest) to the logits' size: ids and classes stay whole."""
    if targets.shape[-1] == size:
        return targets
    return F.interpolate(targets.float(), size=(size, size), mode="nearest").to(targets.dtype)


def dense_loss(kind: str, logits: torch.Tensor, targets: torch.Tensor, typed: bool) -> torch.Tensor:
    """Per-sample loss of one dense task: `logits` (n, outputs, S, S), `targets` (n, 2, P, P)
    subsampled to S first (the nuclei boundary class is then drawn at S: 1 px there)."""
    targets = at_size(targets, logits.shape[-1]).long()
    if kind == "segmentation":
        return ce_dice(logits, targets[:, 0])
    loss = ce_dice(logits[:, :3], nucleus_classes(targets[:, 0]))
    if typed:
        loss = loss + ce_dice(logits[:, 3:], targets[:, 1])
    return loss
