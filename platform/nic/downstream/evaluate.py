"""Slide predictions with test-time averaging over T crops x the 8 rotations/flips.

NIC averages a slide's prediction over T random crops (centres drawn as in training) under each of
the 8 dihedral transforms. What is averaged is the prediction, not the raw output: probabilities
for classification, the de-normalised value for regression, the log-risk for survival.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nic.downstream.dataset import GridSource


def outputs_to_prediction(kind: str, outputs: torch.Tensor, target_mean: float = 0.0, target_std: float = 1.0) -> np.ndarray:
    """Model outputs (B, K) -> predictions: P(class 1) (B,), class probabilities (B, K), the value
    in target units (B,), or the log-risk (B,)."""
    if kind == "binary":
        return torch.sigmoid(outputs[:, 0]).cpu().numpy()
    if kind == "multiclass":
        return torch.softmax(outputs, dim=1).cpu().numpy()
    if kind == "regression":
        return (outputs[:, 0] * target_std + target_mean).cpu().numpy()
    if kind == "survival":
        return outputs[:, 0].cpu().numpy()
    raise ValueError(f"unknown target kind {kind!r}")


@torch.no_grad()
def tta_predict_slide(
    model: nn.Module,
    source: GridSource,
    slide_id: str,
    kind: str,
    crop_size: int,
    tta_crops: int = 10,
    transforms: Sequence[int] = tuple(range(8)),
    seed: int = 0,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    target_mean: float = 0.0,
    target_std: float = 1.0,
) -> np.ndarray:
    """Mean prediction of one slide over tta_crops crops under each transform in `transforms`."""
    model.eval()
    rng = np.random.default_rng((seed, zlib.crc32(slide_id.encode())))  # same views in every process
    preds = []
    for k in transforms:
        views = source.crops(slide_id, k, max(1, tta_crops), crop_size, rng)
        for start in range(0, len(views), batch_size):
            chunk = views[start:start + batch_size]
            g = torch.from_numpy(np.stack([v[0] for v in chunk])).float().to(device)
            m = torch.from_numpy(np.stack([v[1] for v in chunk])).to(device)
            preds.append(outputs_to_prediction(kind, model(g, m), target_mean, target_std))
    return np.concatenate(preds, axis=0).mean(axis=0)


def predict_slides(
    model: nn.Module,
    grids_dir: str | Path,
    slide_ids: Sequence[str],
    kind: str,
    crop_size: int,
    tta_crops: int = 10,
    dihedral: bool = True,
    seed: int = 0,
    device: torch.device | str = "cpu",
    target_mean: float = 0.0,
    target_std: float = 1.0,
) -> np.ndarray:
    """Test-time averaged predictions of many slides, (N,) or (N, K); grids read one at a time."""
    source = GridSource(grids_dir, cache_size=1)
    transforms = tuple(range(8)) if dihedral else (0,)
    out = [
        tta_predict_slide(model, source, s, kind, crop_size, tta_crops, transforms, seed, device,
                          target_mean=target_mean, target_std=target_std)
        for s in slide_ids
    ]
    return np.stack(out) if out else np.zeros((0,))


def prediction_columns(kind: str, pred: np.ndarray, classes: Sequence[str]) -> dict[str, np.ndarray]:
    """Named prediction columns of predictions.parquet: 'prediction' (P(class 1), the value, the
    log-risk, or the argmax class), plus 'predicted_class' (binary) or 'prob_<class>' (multiclass)."""
    if kind == "multiclass":
        cols = {f"prob_{c}": pred[:, i] for i, c in enumerate(classes)}
        cols["prediction"] = pred.argmax(axis=1).astype(float)
        return cols
    cols = {"prediction": np.asarray(pred, dtype=float)}
    if kind == "binary":
        cols["predicted_class"] = (cols["prediction"] >= 0.5).astype(int)
    return cols
