"""Post-processing of nuclei predictions to instances, and the dense tasks' validation metrics.

Instances from the background/interior/boundary map (per tile, NumPy/scikit-image on the CPU):

1. every pixel takes its most probable class; foreground = interior or boundary;
2. markers = connected components (8-connected) of interior pixels of at least
   `MIN_MARKER_PX` pixels (smaller ones are noise);
3. a marker-controlled watershed on the negative distance to background, restricted to the
   foreground, grows each marker over the boundary pixels around it (so touching nuclei split
   where their boundaries meet);
4. foreground components that hold no marker become one instance each; instances smaller than
   `MIN_INSTANCE_PX` are dropped.

Metrics are computed from per-sample parts, summed over the whole validation set (gathered over
workers), so they do not depend on how the set was sharded:

- Dice per class = 2 sum(pred & true) / (sum pred + sum true); `<task>/dice` is the mean over the
  foreground classes that occur in truth or prediction (segmentation: every class but the task's
  `background`; nuclei: nucleus vs background);
- PQ (panoptic quality, Kirillov et al. 2019, as used for nuclei by HoVer-Net/Cerberus): a predicted
  and a true nucleus match when their IoU > 0.5 (then the match is unique);
  PQ = sum of matched IoUs / (TP + FP / 2 + FN / 2), TP/FP/FN summed over tiles ("aggregated" PQ);
- count_r: Pearson r of predicted vs true nucleus counts per tile.
"""

from __future__ import annotations

import numpy as np

MIN_MARKER_PX = 3
MIN_INSTANCE_PX = 6


def instances_from_classes(classes: np.ndarray, min_marker: int = MIN_MARKER_PX,
                           min_instance: int = MIN_INSTANCE_PX) -> np.ndarray:
    """(H, W) map of 0 background / 1 interior / 2 boundary -> (H, W) int32 instance ids 1..n."""
    from scipy import ndimage
    from skimage.segmentation import watershed

    fg = classes > 0
    if not fg.any():
        return np.zeros(classes.shape, np.int32)
    eight = np.ones((3, 3), bool)
    markers, n = ndimage.label(classes == 1, structure=eight)
    if n:
        sizes = np.bincount(markers.ravel(), minlength=n + 1)
        keep = sizes >= min_marker
        keep[0] = False
        relabel = np.where(keep, np.cumsum(keep), 0)
        markers = relabel[markers]
    inst = watershed(-ndimage.distance_transform_edt(fg), markers, mask=fg) if markers.any() else np.zeros_like(markers)
    orphans, n_orphans = ndimage.label(fg & (inst == 0), structure=eight)
    inst = np.where(orphans > 0, orphans + inst.max(), inst)
    sizes = np.bincount(inst.ravel())
    small = sizes < min_instance
    small[0] = False
    if small.any():
        inst = np.where(small[inst], 0, inst)
    ids = np.unique(inst)
    lookup = np.zeros(int(ids.max()) + 1, np.int32)
    lookup[ids] = np.arange(len(ids), dtype=np.int32)  # renumber 1..n (0 stays 0)
    return lookup[inst]


def dice_parts(pred: np.ndarray, true: np.ndarray, num_classes: int,
               valid: np.ndarray | None = None) -> np.ndarray:
    """(3, num_classes): per class the intersection, predicted and true pixel counts."""
    if valid is None:
        valid = true >= 0
    p, t = pred[valid].astype(np.int64), true[valid].astype(np.int64)
    inter = np.bincount(t[p == t], minlength=num_classes)[:num_classes]
    return np.stack([inter, np.bincount(p, minlength=num_classes)[:num_classes],
                     np.bincount(t, minlength=num_classes)[:num_classes]]).astype(np.float64)


def mean_dice(parts: np.ndarray, classes: list[int]) -> float:
    """Mean Dice over `classes` that occur in truth or prediction; NaN when none does."""
    inter, psum, tsum = parts
    scores = [2 * inter[c] / (psum[c] + tsum[c]) for c in classes if psum[c] + tsum[c] > 0]
    return float(np.mean(scores)) if scores else float("nan")


def match_instances(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """[TP, FP, FN, sum of matched IoUs] of two instance maps (0 = background), IoU > 0.5 matching."""
    n_pred, n_true = int(pred.max(initial=0)), int(true.max(initial=0))
    p_ids = np.unique(pred[pred > 0])
    t_ids = np.unique(true[true > 0])
    if n_pred == 0 or n_true == 0:
        return np.array([0, len(p_ids), len(t_ids), 0.0])
    joint = np.bincount(pred.ravel().astype(np.int64) * (n_true + 1) + true.ravel().astype(np.int64),
                        minlength=(n_pred + 1) * (n_true + 1)).reshape(n_pred + 1, n_true + 1)
    area_p, area_t = joint.sum(1), joint.sum(0)
    inter = joint[1:, 1:].astype(np.float64)
    union = area_p[1:, None] + area_t[None, 1:] - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    matched = iou > 0.5  # at most one per row and column
    tp = int(matched.sum())
    return np.array([tp, len(p_ids) - tp, len(t_ids) - tp, float(iou[matched].sum())])


def panoptic_quality(tp: float, fp: float, fn: float, iou_sum: float) -> float:
    """PQ = iou_sum / (TP + FP/2 + FN/2): NaN when there is nothing at all."""
    denom = tp + 0.5 * fp + 0.5 * fn
    return float(iou_sum / denom) if denom > 0 else float("nan")


def pearson_r(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; NaN when either side is constant or has fewer than two values."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def count_instances(inst: np.ndarray) -> int:
    return int(len(np.unique(inst[inst > 0])))


def instance_types(inst: np.ndarray, types: np.ndarray, num_types: int) -> np.ndarray:
    """Type of each instance 1..n (index i - 1): the majority of the predicted type map over its
    pixels, background (0) votes left out; 0 when none of its pixels has a type."""
    n = int(inst.max(initial=0))
    if n == 0:
        return np.zeros(0, np.int64)
    sel = (inst > 0) & (types > 0)
    votes = np.zeros((n + 1, num_types + 1), np.int64)
    np.add.at(votes, (inst[sel], types[sel]), 1)
    best = votes[1:, 1:].argmax(1) + 1
    return np.where(votes[1:, 1:].sum(1) > 0, best, 0)
