"""Slide-level models on feature grids: the NIC grid CNN and a gated attention-MIL head.

Both take a batch of grids (B, C, H, W) with their tissue masks (B, H, W) and return (B, outputs):
one value (a logit for binary, a value for regression, a log-risk for survival) or K logits.

NicGridCNN follows NIC (Tellez et al., TPAMI 2019): 8 depthwise-separable 3x3 conv layers of 128
filters with BatchNorm, LeakyReLU and 20 % feature-wise (channel) dropout, stride 2 except layers
7 and 8, a global max pool (the paper's choice; mean is an option), dense 128, one output. Padding
"same" makes it accept grids of any size, down to 1 x 1.

AttentionMIL treats the tissue cells of a grid as a bag of instances (Ilse et al., ICML 2018, gated
attention, the pooling CLAM and similar tools use): a per-cell MLP, attention weights from
tanh/sigmoid gates, a softmax over the tissue cells only (the mask), and a classifier on the
attention-weighted mean. Cell positions do not matter to it, so it is a useful contrast to the CNN.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Literal

import torch
from torch import nn

ModelName = Literal["nic-cnn", "attention-mil"]


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


class NicGridCNN(nn.Module):
    """The NIC downstream CNN over (B, C, H, W) grids of any size."""

    def __init__(
        self,
        in_channels: int,
        outputs: int = 1,
        width: int = 128,
        layers: int = 8,
        dropout: float = 0.2,
        pool: Literal["max", "mean"] = "max",
    ):
        super().__init__()
        if layers < 2:
            raise ValueError(f"NicGridCNN needs at least 2 layers, got {layers}")
        blocks = []
        channels = in_channels
        for i in range(layers):
            stride = 1 if i >= layers - 2 else 2  # the last two layers keep the resolution
            blocks.append(SeparableConvBlock(channels, width, stride, dropout))
            channels = width
        self.features = nn.Sequential(*blocks)
        self.pool = pool
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

    def forward(self, grid: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.features(grid)
        x = x.amax(dim=(2, 3)) if self.pool == "max" else x.mean(dim=(2, 3))
        return self.head(x)


class AttentionMIL(nn.Module):
    """Gated attention pooling over the tissue cells of a grid (Ilse et al. 2018)."""

    def __init__(self, in_channels: int, outputs: int = 1, hidden: int = 128, attention: int = 64, dropout: float = 0.2):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_channels, hidden), nn.LeakyReLU(0.2), nn.Dropout(dropout))
        self.attn_v = nn.Linear(hidden, attention)
        self.attn_u = nn.Linear(hidden, attention)
        self.attn_w = nn.Linear(attention, 1)
        self.head = nn.Linear(hidden, outputs)

    def attention(self, grid: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-cell features (B, N, hidden), attention weights (B, N)) with N = H * W; weights are
        zero off tissue and sum to 1 over each grid's tissue cells."""
        b, c, h, w = grid.shape
        cells = grid.flatten(2).transpose(1, 2)  # (B, N, C)
        feats = self.embed(cells)
        scores = self.attn_w(torch.tanh(self.attn_v(feats)) * torch.sigmoid(self.attn_u(feats))).squeeze(-1)
        if mask is None:
            valid = torch.ones(b, h * w, dtype=torch.bool, device=grid.device)
        else:
            valid = mask.reshape(b, h * w).bool()
            # A crop without tissue would make the softmax 0/0; let it attend to every cell instead.
            valid = valid | ~valid.any(dim=1, keepdim=True)
        scores = scores.masked_fill(~valid, float("-inf"))
        return feats, torch.softmax(scores, dim=1)

    def forward(self, grid: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        feats, weights = self.attention(grid, mask)
        pooled = torch.bmm(weights.unsqueeze(1), feats).squeeze(1)
        return self.head(pooled)


def build_model(name: ModelName, in_channels: int, outputs: int, dropout: float = 0.2, **kwargs) -> nn.Module:
    """A model by config name."""
    if name == "nic-cnn":
        return NicGridCNN(in_channels, outputs, dropout=dropout, **kwargs)
    if name == "attention-mil":
        return AttentionMIL(in_channels, outputs, dropout=dropout, **kwargs)
    raise ValueError(f"unknown model {name!r}; expected 'nic-cnn' or 'attention-mil'")


def save_model(path: str | Path, model: nn.Module, meta: dict) -> Path:
    """Weights plus everything needed to rebuild and apply the model (name, C, outputs, kind, crop
    size, target normalisation, class names), written atomically."""
    from nic.artifacts import atomic_path

    module = model.module if hasattr(model, "module") else model  # unwrap DDP
    with atomic_path(path) as tmp:
        torch.save({"meta": dict(meta), "state_dict": module.state_dict()}, tmp)
    return Path(path)


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """(model in eval mode, meta) from save_model's file; a clear error when it is not one."""
    path = Path(path)
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
        meta = blob["meta"]
        model = build_model(meta["model"], int(meta["in_channels"]), int(meta["outputs"]),
                            dropout=float(meta.get("dropout", 0.2)))
        model.load_state_dict(blob["state_dict"])
    except (OSError, KeyError, RuntimeError, TypeError, ValueError, pickle.UnpicklingError) as exc:
        raise ValueError(f"{path}: not a usable downstream model file: {exc}") from exc
    return model.eval(), meta
