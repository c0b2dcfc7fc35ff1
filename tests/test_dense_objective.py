"""Dense tasks in the multitask objective: decoders on both trunks, the masked loss with dense and
patch tasks in one batch, targets, augmentation of masks, post-processing and metrics against
hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nic.config.encoder import AugmentOptions
from nic.encoders.dense_loss import nucleus_classes
from nic.encoders.dense_metrics import (
    dice_parts,
    instance_types,
    instances_from_classes,
    match_instances,
    mean_dice,
    panoptic_quality,
    pearson_r,
)
from nic.encoders.dense_tasks import dense_metrics
from nic.encoders.encoder import build_encoder
from nic.encoders.objectives import MultiTaskObjective, TaskHeadSpec
from nic.patches.augment import Augmenter

PX = 64
TASKS = [
    TaskHeadSpec("tumour", "binary", 1),
    TaskHeadSpec("regions", "segmentation", 3, classes=["glass", "light", "dark"], background=0),
    TaskHeadSpec("cells", "nuclei", 6, classes=["small", "large"]),
]


def _batch(task_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = len(task_ids)
    x = torch.rand(n, 3, PX, PX, generator=g)
    t = torch.tensor(task_ids)
    y = torch.randint(0, 2, (n,), generator=g).float()
    masks = torch.full((n, 2, PX, PX), -1, dtype=torch.int16)
    for i, k in enumerate(task_ids):
        if k == 1:
            masks[i, 0] = torch.randint(0, 3, (PX, PX), generator=g)
        elif k == 2:
            inst = torch.zeros(PX, PX, dtype=torch.int16)
            inst[10:20, 10:20], inst[30:40, 12:22] = 1, 2
            masks[i, 0], masks[i, 1] = inst, (inst > 0).short() * 2
    return x, t, y, masks


@pytest.mark.parametrize("arch", ["reference", "resnet"])
def test_decoders_ride_on_both_trunks_and_keep_the_embedding(arch: str) -> None:
    encoder = build_encoder(arch, 16, PX, seed=0)
    model = MultiTaskObjective(encoder, TASKS)
    assert set(model.heads) == {"tumour"} and set(model.decoders) == {"regions", "cells"}
    maps = encoder.maps_and_embedding(torch.rand(2, 3, PX, PX))[0]
    assert model.decoders["cells"](maps, PX).shape == (2, 6, PX, PX)
    encoder.eval()
    x = torch.randint(0, 256, (2, 3, PX, PX), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(encoder.maps_and_embedding(x)[1], encoder(x), atol=1e-5)
    state = model.extra_state()
    assert "decoders" in state and [t["name"] for t in state["tasks"]] == ["tumour", "regions", "cells"]
    assert "background" not in state["tasks"][0] and state["tasks"][1]["background"] == 0
    with pytest.raises(ValueError, match="dense tasks need the reference or resnet trunk"):
        MultiTaskObjective(build_encoder("mean-rgb", 3, PX), TASKS)


def test_patch_only_objective_is_unchanged() -> None:
    """No decoders, no extra parameters, and the same initialisation as before dense tasks."""
    torch.manual_seed(3)
    model = MultiTaskObjective(build_encoder("reference", 16, PX, seed=0), TASKS[:1])
    assert not model.has_dense and not hasattr(model, "decoders") and "decoders" not in model.extra_state()
    assert set(model.state_dict()) == {k for k in model.state_dict() if k.startswith(("encoder.", "heads."))}


def test_masked_loss_mixes_dense_and_patch_tasks_and_absent_tasks_get_zero_gradient() -> None:
    model = MultiTaskObjective(build_encoder("reference", 16, PX, seed=0), TASKS)
    x, t, y, masks = _batch([0, 2, 0, 2, 2])  # no segmentation sample
    out = model(x, t, y, masks=masks)
    assert set(out) == {"loss", "loss/tumour", "loss/cells"}
    assert float(out["loss"].detach()) == pytest.approx(float(out["loss/tumour"]) + float(out["loss/cells"]), rel=1e-5)
    out["loss"].backward()
    for p in model.decoders["regions"].parameters():  # absent: not in the graph at all
        assert p.grad is None or torch.count_nonzero(p.grad) == 0
    assert any(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in model.decoders["cells"].parameters())
    assert all(p.grad is not None for p in model.heads["tumour"].parameters())
    assert any(torch.count_nonzero(p.grad) > 0 for p in model.encoder.parameters() if p.grad is not None)

    model.zero_grad(set_to_none=True)
    x, t, y, masks = _batch([1, 1, 2])  # no patch sample: the patch head gets nothing
    model(x, t, y, masks=masks)["loss"].backward()
    assert all(p.grad is None for p in model.heads["tumour"].parameters())
    assert any(p.grad is not None and torch.count_nonzero(p.grad) > 0
               for p in model.decoders["regions"].parameters())

    # the task weight scales the task's share
    weighted = [TASKS[0], TASKS[1], TaskHeadSpec("cells", "nuclei", 6, weight=2.5, classes=["small", "large"])]
    model2 = MultiTaskObjective(build_encoder("reference", 16, PX, seed=0), weighted)
    model2.load_state_dict(model.state_dict())
    x, t, y, masks = _batch([2, 2])
    a, b = model(x, t, y, masks=masks), model2(x, t, y, masks=masks)
    assert float(b["loss"].detach()) == pytest.approx(2.5 * float(a["loss"].detach()), rel=1e-5)


def test_validation_columns_and_metric_keys() -> None:
    model = MultiTaskObjective(build_encoder("reference", 16, PX, seed=0), TASKS).eval()
    x, t, y, masks = _batch([0, 1, 2, 0, 1, 2])
    cols = model.validation_step(x, t, y, masks=masks)
    assert cols["dense_dice"].shape == (6, 3, 3) and cols["dense_pq"].shape == (6, 4)
    assert (cols["dense_count"][[2, 5], 1] == 2).all()  # two true nuclei per cells tile
    assert (cols["loss"] > 0).all()
    metrics = model.validation_metrics(cols)
    for key in ("tumour/auc", "regions/dice", "regions/loss", "cells/dice", "cells/pq", "cells/count_r",
                "cells/loss", "val_loss"):
        assert key in metrics
    parts = ["tumour/loss", "regions/loss", "cells/loss"]
    assert metrics["val_loss"] == pytest.approx(sum(metrics[k] for k in parts), rel=1e-6)


# ------------------------------------------------------------------------------------ targets


def test_nucleus_classes_mark_boundaries_between_touching_nuclei() -> None:
    inst = torch.zeros(1, 6, 8, dtype=torch.int16)
    inst[0, 1:5, 1:4], inst[0, 1:5, 4:7] = 1, 2
    got = nucleus_classes(inst)[0]
    expected = torch.zeros(6, 8, dtype=torch.long)
    expected[1:5, 1:7] = 2
    expected[2:4, 2], expected[2:4, 5] = 1, 1
    assert torch.equal(got, expected)
    assert (nucleus_classes(torch.full((1, 4, 4), -1, dtype=torch.int16)) == -1).all()


def test_augmenter_moves_masks_with_their_tiles() -> None:
    options = AugmentOptions(hed_sigma=0.0, hed_bias=0.0, contrast=0.0, brightness=0.0, blur_prob=0.0, noise_std=0.0,
                             crop_scale=1.0)
    x = torch.zeros(6, 3, 16, 16)
    x[:, 0, 2:5, 9:14] = 1.0  # a red patch: its mask must go where it goes
    targets = (x[:, :1] > 0).repeat(1, 2, 1, 1).short()
    xa, ta = Augmenter(options, seed=4)(x, targets)
    assert torch.equal(xa[:, 0] > 0.5, ta[:, 0] > 0) and torch.equal(ta[:, 0], ta[:, 1])
    # the same random draws with or without targets: patch batches augment as before
    crop = AugmentOptions(crop_scale=0.6)
    assert torch.equal(Augmenter(crop, seed=5)(x), Augmenter(crop, seed=5)(x, targets)[0])
    xa, ta = Augmenter(crop, seed=5)(x, targets * 7)
    assert set(torch.unique(ta).tolist()) <= {0, 7}  # nearest: no blended ids


# ------------------------------------------------------------------------------------ metrics


def test_dice_against_hand_computed_cases() -> None:
    true = np.array([[0, 1, 1], [2, 2, -1]])
    pred = np.array([[0, 1, 2], [2, 2, 1]])
    parts = dice_parts(pred, true, 3)  # the ignored pixel (-1) is left out
    np.testing.assert_array_equal(parts, [[1, 1, 2], [1, 1, 3], [1, 2, 2]])
    # class 1: 2*1/(1+2) = 2/3; class 2: 2*2/(3+2) = 4/5; background left out
    assert mean_dice(parts, [1, 2]) == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert np.isnan(mean_dice(np.zeros((3, 2)), [1]))


def test_pq_and_instances_against_hand_computed_cases() -> None:
    true = np.zeros((10, 10), int)
    true[0:4, 0:4], true[6:10, 6:10], true[0:2, 7:9] = 1, 2, 3
    pred = np.zeros((10, 10), int)
    pred[0:4, 0:3] = 5  # IoU 12/16 with 1
    pred[6:10, 8:10] = 7  # IoU 8/16 = 0.5 with 2: not a match (> 0.5 needed)
    pred[5, 0:3] = 9  # nothing there
    tp, fp, fn, iou = match_instances(pred, true)
    assert (tp, fp, fn) == (1, 2, 2) and iou == pytest.approx(0.75)
    assert panoptic_quality(tp, fp, fn, iou) == pytest.approx(0.75 / (1 + 1 + 1))
    assert np.isnan(panoptic_quality(0, 0, 0, 0))
    assert tuple(match_instances(np.zeros((3, 3), int), true[:3, :3])[:3]) == (0, 0, 1)

    # two touching nuclei split by their boundary pixels come back as two instances
    classes = np.zeros((12, 16), int)
    classes[2:10, 1:8], classes[2:10, 8:15] = 2, 2
    classes[3:9, 2:7], classes[3:9, 9:14] = 1, 1
    inst = instances_from_classes(classes)
    assert sorted(np.unique(inst).tolist()) == [0, 1, 2]
    assert (inst[2:10, 1:8] == inst[5, 4]).all() and (inst[2:10, 8:15] == inst[5, 11]).all()
    classes[11, 0:3] = 2  # a foreground fragment without interior: its own instance (6 px minimum: dropped)
    assert len(np.unique(instances_from_classes(classes))) == 3
    assert instances_from_classes(np.zeros((4, 4), int)).max() == 0
    types = np.zeros_like(classes)
    types[2:10, 1:8] = 2
    types[2:4, 1:8] = 1  # a minority of instance 1's pixels
    types[2:10, 8:15] = 1
    expected = {int(inst[5, 4]): 2, int(inst[5, 11]): 1}
    assert instance_types(inst, types, 2).tolist() == [expected[1], expected[2]]


def test_count_r_and_dense_metrics_from_columns() -> None:
    assert pearson_r(np.array([1, 2, 3]), np.array([2, 4, 6])) == pytest.approx(1.0)
    assert pearson_r(np.array([1, 2, 3]), np.array([3, 2, 1])) == pytest.approx(-1.0)
    assert np.isnan(pearson_r(np.array([1, 1]), np.array([1, 2])))
    specs = [TaskHeadSpec("cells", "nuclei", 3)]
    columns = {
        "task": np.array([0, 0, 0]), "loss": np.array([1.0, 2.0, 3.0]),
        "dense_dice": np.array([[[2], [3], [3]], [[1], [1], [2]], [[0], [0], [0]]], float),
        "dense_pq": np.array([[1, 0, 1, 0.8], [1, 1, 0, 0.6], [0, 0, 0, 0]], float),
        "dense_count": np.array([[1, 2], [2, 1], [0, 0]], float),
    }
    m = dense_metrics(specs, columns)
    assert m["cells/dice"] == pytest.approx(2 * 3 / (4 + 5))
    assert m["cells/pq"] == pytest.approx(1.4 / (2 + 0.5 + 0.5))
    assert m["cells/count_r"] == pytest.approx(pearson_r(np.array([1, 2, 0]), np.array([2, 1, 0])))
    assert m["cells/loss"] == pytest.approx(2.0)
