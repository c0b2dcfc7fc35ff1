"""Head maps: what an MTL encoder's own task heads say about each tile, for `nic compress --heads`.

A pathologist looks first at "where is the tumour, how many mitoses", not at a 128-D vector; the
MTL encoder was trained with heads that answer exactly that, so compression can write their
answers beside the embedding (Cerberus offers the same as its WSI-level output). Each task
becomes one or more named float32 columns of the grid rows:

    binary       head:<task>            probability of the positive class (the task's 2nd class)
    multiclass   head:<task>=<class>    probability of each class (softmax; they sum to 1)
    regression   head:<task>            the predicted value, in label units
    segmentation head:<task>=<class>    fraction of the tile's pixels predicted as each class
    nuclei       head:<task>            number of nuclei in the tile
                 head:<task>=<type>     ... of each nucleus type (typed tasks; a nucleus none of
                                        whose pixels is typed counts in the total only)

Patch heads read the embedding the grid stores (the inference encoder's output, before its
float16 rounding), so they cost a matrix product. Dense heads need the trunk's intermediate maps,
which the fused inference encoder does not expose: they run the plain trunk once more (float32)
and their decoder at half resolution, upsampled to the tile as in validation. Nucleus counts use
the documented post-processing (nic.encoders.dense_metrics: argmax, markers from interiors,
watershed, small instances dropped; types by majority vote), the same that `<task>/count_r` in
encoder.json measures, so the counts a grid holds are the ones whose accuracy training reported.
The watershed costs about 7 ms per 128 px tile on one CPU, a few times the encoding itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nic.encoders.artifact import HEADS_WEIGHTS, EncoderInfo, load_patch_encoder, read_info
from nic.encoders.encoder import PatchEncoder
from nic.encoders.objectives import TaskHeadSpec, _make_head

HEAD_PREFIX = "head:"
MTL_KIND = "mtl"


class HeadsUnavailable(ValueError):
    """The encoder has no task heads to map (not an MTL encoder, or its heads.pt is missing)."""


def head_columns(tasks: list[TaskHeadSpec]) -> list[str]:
    """Column names of every task's per-tile outputs, in task order (see the module docstring)."""
    names: list[str] = []
    for spec in tasks:
        base = f"{HEAD_PREFIX}{spec.name}"
        if spec.kind in ("binary", "regression"):
            names.append(base)
        elif spec.kind in ("multiclass", "segmentation"):
            names.extend(f"{base}={c}" for c in _class_names(spec))
        elif spec.kind == "nuclei":
            names.append(base)
            names.extend(f"{base}={c}" for c in spec.classes or [])
        else:
            raise ValueError(f"task '{spec.name}': no head map for kind '{spec.kind}'")
    return names


def _class_names(spec: TaskHeadSpec) -> list[str]:
    return list(spec.classes) if spec.classes else [str(i) for i in range(spec.num_outputs)]


def _folder(path: str | Path) -> Path:
    path = Path(path)
    return path.parent if path.suffix == ".json" else path


def check_has_heads(encoder: str | Path, info: EncoderInfo) -> Path:
    """heads.pt of an MTL encoder, else HeadsUnavailable naming the encoder and why."""
    if info.kind != MTL_KIND:
        raise HeadsUnavailable(
            f"--heads needs a supervised multitask (mtl) encoder, whose task heads give the head maps; "
            f"encoder {info.name!r} is a {info.kind!r} encoder and has no task heads (drop --heads, or "
            f"compress with an encoder from nic train-encoder --kind mtl)")
    heads = _folder(encoder) / HEADS_WEIGHTS
    if not heads.is_file():
        raise HeadsUnavailable(f"--heads: encoder {info.name!r} is a multitask encoder but {heads} is missing "
                               f"(its task heads and dense decoders live there; copy the whole encoder folder)")
    return heads


class HeadMapper(nn.Module):
    """(uint8 tiles, their embeddings) -> float32 (N, len(columns)) head outputs, in inference mode."""

    def __init__(self, encoder: PatchEncoder, tasks: list[TaskHeadSpec], heads: nn.ModuleDict,
                 decoders: nn.ModuleDict | None):
        super().__init__()
        self.encoder = encoder.eval()
        self.tasks = tasks
        self.heads = heads.eval()
        self.decoders = decoders.eval() if decoders is not None else None
        self.columns = tuple(head_columns(tasks))

    @torch.inference_mode()
    def forward(self, tiles: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        embedding = embedding.float()
        maps = None
        if self.decoders is not None and len(self.decoders):
            maps = self.encoder.trunk.feature_maps(PatchEncoder.normalise(tiles))
        parts = []
        for spec in self.tasks:
            if spec.name in self.heads:
                parts.append(self._patch(spec, self.heads[spec.name](embedding)))
            else:
                assert maps is not None and self.decoders is not None
                logits = self.decoders[spec.name](maps, out_px=self.encoder.tile_px)
                parts.append(dense_summary(spec, logits))
        out = torch.cat(parts, dim=1) if parts else embedding.new_zeros((len(embedding), 0))
        return out.float()

    @staticmethod
    def _patch(spec: TaskHeadSpec, logits: torch.Tensor) -> torch.Tensor:
        if spec.kind == "binary":
            return torch.sigmoid(logits[:, :1])
        if spec.kind == "multiclass":
            return torch.softmax(logits, dim=1)
        return logits[:, :1] * spec.target_std + spec.target_mean


def dense_summary(spec: TaskHeadSpec, logits: torch.Tensor) -> torch.Tensor:
    """Per-tile summary of a dense task's logits at tile size: class fractions (segmentation) or
    nucleus counts, total then per type (nuclei)."""
    from nic.encoders.dense_metrics import instance_types, instances_from_classes

    if spec.kind == "segmentation":
        pred = logits.argmax(1)
        k = logits.shape[1]
        onehot = F.one_hot(pred, k).flatten(1, 2).float()
        return onehot.mean(1)
    classes = logits[:, :3].argmax(1).cpu().numpy()
    kinds = len(spec.classes or [])
    types = logits[:, 3:].argmax(1).cpu().numpy() if kinds else None
    out = np.zeros((len(classes), 1 + kinds), np.float32)
    for i in range(len(classes)):
        inst = instances_from_classes(classes[i])
        out[i, 0] = int(inst.max(initial=0))
        if types is not None:
            labels = instance_types(inst, types[i], kinds)
            out[i, 1:] = np.bincount(labels, minlength=kinds + 1)[1:]
    return torch.from_numpy(out).to(logits.device)


def load_head_mapper(encoder: str | Path, device: str | torch.device = "cpu") -> HeadMapper:
    """The HeadMapper of an MTL encoder folder (HeadsUnavailable for any other encoder)."""
    from nic.encoders.dense_tasks import build_decoders, is_dense

    info = read_info(encoder)
    path = check_has_heads(encoder, info)
    trunk_encoder, _ = load_patch_encoder(encoder)
    state = torch.load(path, map_location="cpu", weights_only=True)
    unusable = f"{path}: not the task heads of encoder {info.name!r}"
    try:  # what heads.pt says: a file without these keys (or of another layout) has no usable heads
        tasks = [TaskHeadSpec(**t) for t in state["tasks"]]
        hidden = int(state.get("head_hidden", 0))
    except (KeyError, TypeError) as exc:
        raise HeadsUnavailable(f"{unusable} ({exc})") from None
    # The modules are built outside the try blocks: an error in nic's own code keeps its traceback
    # instead of being reported as unusable heads (exit 2 in nic compress).
    heads = nn.ModuleDict({t.name: _make_head(trunk_encoder.embedding_dim, t.num_outputs, hidden)
                           for t in tasks if not is_dense(t)})
    decoders = (build_decoders(tasks, trunk_encoder.trunk.map_channels)
                if any(is_dense(t) for t in tasks) else None)
    try:  # the weights must fit the modules the file describes
        heads.load_state_dict(state["heads"])
        if decoders is not None:
            decoders.load_state_dict(state["decoders"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise HeadsUnavailable(f"{unusable} ({exc})") from None
    return HeadMapper(trunk_encoder, tasks, heads, decoders).to(device).eval()
