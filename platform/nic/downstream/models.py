"""Slide-level models on feature grids: the NIC grid CNN and a gated attention-MIL head.

Both take a batch of grids (B, C, H, W) with their tissue masks (B, H, W) and return (B, outputs):
one value (a logit for binary, a value for regression, a log-risk for survival) or K logits.

Both pool over tissue only, with the pooling a choice (`pool`):

- "max": the largest value of each feature over the tissue cells. Says whether a pattern occurs
  *anywhere* (NIC's choice, the paper default of the CNN).
- "mean": the mean over the tissue cells (weighted by how much tissue each cell's receptive field
  holds, for the CNN). Says how much of the tissue shows a pattern: what a rate or a density (e.g.
  mitoses per tumour area) needs, since a max cannot count.
- "attention": gated attention (Ilse et al., ICML 2018): learned per-cell weights, a softmax over
  the tissue cells only, and the weighted mean. A mean that learns which cells matter.

Background cells (mask False) can never change a prediction: the input is zeroed there before
anything else, and pooling never looks at a cell without tissue. A crop without any tissue pools to
the zero vector, so its prediction is the head's output for "no evidence" (finite, the same for
every empty crop) instead of the NaN a softmax or mean over no cells would give.

NicGridCNN follows NIC (Tellez et al., TPAMI 2019): 8 depthwise-separable 3x3 conv layers of 128
filters with BatchNorm, LeakyReLU and 20 % feature-wise (channel) dropout, stride 2 except layers
7 and 8, global pooling, dense 128, one output. Padding "same" makes it accept grids of any size,
down to 1 x 1. The mask is carried through the layers (see NicGridCNN).

AttentionMIL treats the tissue cells of a grid as a bag of instances (the pooling CLAM and similar
tools use): a per-cell MLP, pooling over the tissue cells, a linear head. Cell positions do not
matter to it, so it is a useful contrast to the CNN.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Literal, cast, get_args

import torch
import torch.nn.functional as F
from torch import nn

ModelName = Literal["nic-cnn", "attention-mil"]
Pool = Literal["max", "mean", "attention"]
POOLS: tuple[str, ...] = get_args(Pool)
#: Each model's own pooling: what `pool=None` builds, and what model files written before pooling
#: was a choice (meta without "pool") were trained with.
MODEL_POOL: dict[str, Pool] = {"nic-cnn": "max", "attention-mil": "attention"}
_TINY = 1e-12
#: Side (cells) the NIC CNN's last feature map should keep at least: the paper's R = 400 crop after
#: its six stride-2 layers is a 7 x 7 map, so pooling has cells to pool over.
MIN_FINAL_SIDE = 6


def strided_layers_for(crop_size: int, layers: int = 8) -> int:
    """How many of the CNN's first layers use stride 2 for an R x R crop: the paper's six at R = 400
    (400 / 2^6 = 6.25), fewer on small grids so the last map keeps >= MIN_FINAL_SIDE cells a side.
    With six on a 46-cell demo grid every crop would end as one cell, where max, mean and attention
    pooling are the same thing and a masked mean cannot be taken at all."""
    n = 0
    while n < layers - 2 and crop_size / 2 ** (n + 1) >= MIN_FINAL_SIDE:
        n += 1
    return n


def check_pool(pool: str) -> Pool:
    """`pool` itself, or a ValueError naming the allowed values."""
    if pool not in POOLS:
        raise ValueError(f"unknown pool {pool!r}; expected one of {', '.join(POOLS)}")
    return pool  # type: ignore[return-value]


def tissue_weight(grid: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, H, W) float: 1 on tissue, 0 on background; every cell is tissue without a mask."""
    b, _, h, w = grid.shape
    if mask is None:
        return torch.ones(b, h, w, dtype=grid.dtype, device=grid.device)
    return mask.to(dtype=grid.dtype)


def zero_background(grid: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The grid with every background cell set to 0 (a `where`, not a product, so that even
    inf or NaN there cannot leak into the output)."""
    return torch.where(weight.unsqueeze(1) > 0, grid, torch.zeros((), dtype=grid.dtype, device=grid.device))


class TissuePooling(nn.Module):
    """Pools per-cell features (B, N, D) over the cells whose tissue weight (B, N) is > 0.

    Subclasses call `_init_pooling` and then `pool_cells`. The attention layers are named
    attn_v / attn_u / attn_w (as AttentionMIL always named them) and exist only for "attention",
    so max and mean models have exactly the parameters they had before pooling was a choice.
    """

    pool: Pool

    def _init_pooling(self, pool: Pool, dim: int, attention: int) -> None:
        self.pool = check_pool(pool)
        if self.pool == "attention":
            self.attn_v = nn.Linear(dim, attention)
            self.attn_u = nn.Linear(dim, attention)
            self.attn_w = nn.Linear(attention, 1)

    def cell_weights(self, feats: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Pooling weights (B, N) of "mean" and "attention": 0 off tissue, summing to 1 over each
        grid's tissue cells (0 everywhere for a grid without tissue). Attention weights are
        proportional to weight x exp(score), so a cell that is part tissue counts in proportion,
        and for a 0/1 mask this is the plain softmax over tissue cells."""
        valid = weight > 0
        has_tissue = valid.any(dim=1, keepdim=True)
        if self.pool == "attention":
            scores = self.attn_w(torch.tanh(self.attn_v(feats)) * torch.sigmoid(self.attn_u(feats))).squeeze(-1)
            logits = torch.where(valid, scores + weight.clamp_min(_TINY).log(), float("-inf"))
            # All -inf would make the softmax 0/0; such rows are zeroed below anyway.
            logits = torch.where(has_tissue, logits, torch.zeros_like(logits))
            out = torch.softmax(logits, dim=1)
        elif self.pool == "mean":
            out = weight / weight.sum(dim=1, keepdim=True).clamp_min(_TINY)
        else:
            raise ValueError("max pooling has no per-cell weights")
        return out * has_tissue

    def pool_cells(self, feats: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """(B, D): masked max, or the `cell_weights`-weighted mean; zero for a grid without tissue.
        `feats` must be finite at background cells (both models zero their input there)."""
        if self.pool == "max":
            valid = weight > 0
            top = feats.masked_fill(~valid.unsqueeze(-1), float("-inf")).amax(dim=1)
            return torch.where(valid.any(dim=1, keepdim=True), top, torch.zeros_like(top))
        return torch.bmm(self.cell_weights(feats, weight).unsqueeze(1), feats).squeeze(1)


class SeparableConvBlock(nn.Module):
    """Depthwise 3x3 + pointwise 1x1 conv, BatchNorm, LeakyReLU, channel dropout."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float):
        super().__init__()
        self.depthwise = nn.Conv2d(in_channels, in_channels, 3, stride=stride, padding=1, groups=in_channels, bias=False)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.LeakyReLU(0.2)
        self.drop = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.act(self.bn(self.pointwise(self.depthwise(x)))))

    def downsample(self, weight: torch.Tensor) -> torch.Tensor:
        """The tissue weight (B, H, W) at this block's output resolution: the mean over the same
        3x3 window, stride and zero padding as the depthwise conv, i.e. (recursively) the fraction
        of tissue an output cell's receptive field saw; > 0 exactly when it saw any tissue."""
        stride = self.depthwise.stride
        return F.avg_pool2d(weight.unsqueeze(1), 3, stride=stride, padding=1, count_include_pad=True).squeeze(1)


class NicGridCNN(TissuePooling):
    """The NIC downstream CNN over (B, C, H, W) grids of any size, pooling over tissue only.

    The mask goes through the layers with the features: the input is zeroed on background, each
    block's tissue weight is the previous one averaged like its depthwise conv (`downsample`), and
    features of output cells that saw no tissue at all are set to 0 again. So background looks like
    the zero padding at the grid border at every layer (a slide surrounded by glass and one at the
    crop's edge look the same), and pooling uses only cells that saw tissue: "mean" weights each by
    its tissue fraction, "attention" multiplies its softmax weight by that fraction. (In training,
    BatchNorm's batch statistics still include background cells, as zeros, like padding; in eval
    mode its running statistics make the output independent of them.)

    `masked=False` is the model before pooling was a choice (mask ignored, pooling over every
    cell), kept only so that model files written then predict exactly as they did (load_model).
    """

    def __init__(
        self,
        in_channels: int,
        outputs: int = 1,
        width: int = 128,
        layers: int = 8,
        dropout: float = 0.2,
        pool: Pool | None = None,
        attention: int = 64,
        masked: bool = True,
        strided: int | None = None,
    ):
        super().__init__()
        if layers < 2:
            raise ValueError(f"NicGridCNN needs at least 2 layers, got {layers}")
        pool = pool or MODEL_POOL["nic-cnn"]
        if not masked and pool == "attention":
            raise ValueError("the unmasked (legacy) NicGridCNN pools with max or mean only")
        # The paper: stride 2 in all but the last two layers; `strided` (strided_layers_for) fewer.
        self.strided = layers - 2 if strided is None else int(strided)
        if not 0 <= self.strided <= layers:
            raise ValueError(f"strided layers must be in [0, {layers}], got {strided}")
        blocks = []
        channels = in_channels
        for i in range(layers):
            stride = 2 if i < self.strided else 1
            blocks.append(SeparableConvBlock(channels, width, stride, dropout))
            channels = width
        self.features = nn.Sequential(*blocks)
        self.masked = masked
        self._init_pooling(pool, width, attention)
        self.head = nn.Sequential(nn.Linear(width, width), nn.LeakyReLU(0.2), nn.Dropout(dropout), nn.Linear(width, outputs))
        self._init_weights()

    def _init_weights(self) -> None:
        """He initialisation for LeakyReLU. PyTorch's default shrinks each separable layer's output
        variance about 9x; BatchNorm hides that in training, but in eval mode its running statistics
        start at var 1 and lag behind, so early in training (and on small cohorts with few steps)
        eight such layers squash every slide to the same prediction."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, a=0.2, mode="fan_in", nonlinearity="leaky_relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def feature_map(self, grid: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (B, width, h, w), tissue weight (B, h, w)) after the conv layers; features are
        0 wherever the weight is 0."""
        weight = tissue_weight(grid, mask)
        x = zero_background(grid, weight)
        for block in cast("Iterable[SeparableConvBlock]", self.features):
            x = block(x)
            weight = block.downsample(weight)
            x = x * (weight > 0).unsqueeze(1).to(x.dtype)
        return x, weight

    def forward(self, grid: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if not self.masked:
            x = self.features(grid)
            return self.head(x.amax(dim=(2, 3)) if self.pool == "max" else x.mean(dim=(2, 3)))
        x, weight = self.feature_map(grid, mask)
        return self.head(self.pool_cells(x.flatten(2).transpose(1, 2), weight.flatten(1)))


class AttentionMIL(TissuePooling):
    """A per-cell MLP and pooling over the tissue cells of a grid (gated attention by default,
    Ilse et al. 2018; "mean" and "max" are the masked mean and max of the cell features)."""

    def __init__(self, in_channels: int, outputs: int = 1, hidden: int = 128, attention: int = 64,
                 dropout: float = 0.2, pool: Pool | None = None):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_channels, hidden), nn.LeakyReLU(0.2), nn.Dropout(dropout))
        self._init_pooling(pool or MODEL_POOL["attention-mil"], hidden, attention)
        self.head = nn.Linear(hidden, outputs)

    def cells(self, grid: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-cell features (B, N, hidden), tissue weight (B, N)) with N = H * W; the features of
        background cells are those of a zero cell, whatever the grid holds there."""
        weight = tissue_weight(grid, mask)
        cells = zero_background(grid, weight).flatten(2).transpose(1, 2)  # (B, N, C)
        return self.embed(cells), weight.flatten(1)

    def attention(self, grid: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-cell features (B, N, hidden), pooling weights (B, N)) for "attention" and "mean":
        weights are zero off tissue and sum to 1 over each grid's tissue cells."""
        feats, weight = self.cells(grid, mask)
        return feats, self.cell_weights(feats, weight)

    def forward(self, grid: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        feats, weight = self.cells(grid, mask)
        return self.head(self.pool_cells(feats, weight))


def build_model(name: ModelName, in_channels: int, outputs: int, dropout: float = 0.2,
                pool: Pool | None = None, **kwargs) -> nn.Module:
    """A model by config name; `pool` None = the model's own pooling (MODEL_POOL)."""
    if pool is not None:
        check_pool(pool)
    if name == "nic-cnn":
        return NicGridCNN(in_channels, outputs, dropout=dropout, pool=pool, **kwargs)
    if name == "attention-mil":
        return AttentionMIL(in_channels, outputs, dropout=dropout, pool=pool, **kwargs)
    raise ValueError(f"unknown model {name!r}; expected 'nic-cnn' or 'attention-mil'")


def model_meta(model: nn.Module) -> dict:
    """What of a model's structure save_model must record beyond its name and sizes: the pooling."""
    module = model.module if hasattr(model, "module") else model
    meta = {"pool": module.pool} if hasattr(module, "pool") else {}
    if isinstance(module, NicGridCNN):
        meta["strided"] = module.strided
    return meta


def save_model(path: str | Path, model: nn.Module, meta: dict) -> Path:
    """Weights plus everything needed to rebuild and apply the model (name, C, outputs, kind, crop
    size, target normalisation, class names, pooling), written atomically. The model's own pooling
    is recorded, so a caller's meta cannot disagree with the weights."""
    from nic.artifacts import atomic_path

    module: nn.Module = getattr(model, "module", model)  # unwrap DDP
    with atomic_path(path) as tmp:
        torch.save({"meta": {**dict(meta), **model_meta(module)}, "state_dict": module.state_dict()}, tmp)
    return Path(path)


def _model_from_meta(meta: dict) -> nn.Module:
    """The model a meta describes. Meta without "pool" was written before pooling was a choice:
    the model's own pooling then, and for nic-cnn the unmasked forward it was trained with."""
    name = meta["model"]
    kwargs: dict = {"dropout": float(meta.get("dropout", 0.2))}
    if "pool" in meta:
        kwargs["pool"] = meta["pool"]
    elif name == "nic-cnn":
        kwargs["masked"] = False
    if name == "nic-cnn" and "strided" in meta:
        kwargs["strided"] = int(meta["strided"])
    return build_model(name, int(meta["in_channels"]), int(meta["outputs"]), **kwargs)


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """(model in eval mode, meta) from save_model's file; a clear error when it is not one."""
    path = Path(path)
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
        meta = blob["meta"]
        model = _model_from_meta(meta)
        model.load_state_dict(blob["state_dict"])
    except (OSError, KeyError, RuntimeError, TypeError, ValueError, pickle.UnpicklingError) as exc:
        raise ValueError(f"{path}: not a usable downstream model file: {exc}") from exc
    return model.eval(), meta
