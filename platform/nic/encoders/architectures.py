"""Encoder trunks in plain PyTorch: the NIC reference CNN, a small ResNet, and mean RGB.

A trunk takes a float batch (N, 3, P, P) already normalised to [-1, 1] and returns (N, C).
`features()` returns the flattened activations before the final dense layer, which the VAE
uses for its log-variance head. The convolutional trunks also expose `feature_maps()` (the input
at half resolution, then every stage's output, finest first; `map_channels` their widths) and
`embed_maps()` (the C-vector from those maps, equal to `forward`), so that dense-task decoders
(nic.encoders.decoders) take skip connections from one shared trunk pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ARCHITECTURES = ("reference", "resnet", "mean-rgb")
POOLS = ("flatten", "avg", "avgmax")
"""How a trunk turns its last feature map into the vector its dense layer reads. `flatten` (the
reference trunk's own, as in the paper) keeps every position of the 3 x 3 map; `avg` (the ResNet's
own) averages it; `avgmax` concatenates the channel means and maxima. Only `avgmax` lets a small,
rare object (a mitotic figure covers ~1 % of a tile) reach the embedding: measured on the synthetic
mitosis task, the reference trunk reached validation AUC 0.74 with `flatten` and 0.93 with `avgmax`
after 4 epochs, a ResNet with `avg` 0.65 after 6 (benchmarks/results/science.md)."""
DEFAULT_POOL = {"reference": "flatten", "resnet": "avg", "mean-rgb": None}


def pool_features(h: torch.Tensor, pool: str) -> torch.Tensor:
    """The vector read by the trunk's dense layer from its last map `h` (N, C, H, W)."""
    if pool == "flatten":
        return torch.flatten(h, 1)
    if pool == "avg":
        return h.mean(dim=(2, 3))
    if pool == "avgmax":
        return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
    raise ValueError(f"unknown pool '{pool}'; known: {', '.join(POOLS)}")


def resolve_pool(architecture: str, pool: str | None) -> str | None:
    """`pool`, or the architecture's own when None; a clear error for a pair that does not exist."""
    if architecture == "mean-rgb":
        return None
    return _trunk_pool(architecture, pool)


def _trunk_pool(architecture: str, pool: str | None) -> str:
    """`resolve_pool` for a trunk that pools (every architecture but mean-rgb)."""
    own = DEFAULT_POOL.get(architecture)
    pool = pool or own
    allowed = ("flatten", "avgmax") if architecture == "reference" else ("avg", "avgmax")
    if pool is None or pool not in allowed:
        raise ValueError(f"pool '{pool}' does not apply to the '{architecture}' trunk; use one of {', '.join(allowed)}")
    return pool


class ReferenceTrunk(nn.Module):
    """NIC's encoder (Tellez et al., TPAMI 2019): the tile average-pooled to 64 x 64, then
    4 x [conv 3x3, 128 filters, stride 2, valid padding, LeakyReLU 0.2, BatchNorm], flatten
    (3 x 3 x 128) and a linear dense layer to C. About 0.6 M parameters at C = 128."""

    def __init__(self, embedding_dim: int = 128, tile_px: int = 128, filters: int = 128, pooled_px: int = 64,
                 pool: str = "flatten"):
        super().__init__()
        self.tile_px = tile_px
        self.pooled_px = pooled_px
        self.pool_kind = pool
        layers: list[nn.Module] = []
        channels, size = 3, pooled_px
        for _ in range(4):
            layers += [nn.Conv2d(channels, filters, 3, stride=2), nn.LeakyReLU(0.2), nn.BatchNorm2d(filters)]
            channels, size = filters, (size - 3) // 2 + 1
        self.convs = nn.Sequential(*layers)
        self.features_dim = filters * size * size if pool == "flatten" else 2 * filters
        self.fc = nn.Linear(self.features_dim, embedding_dim)
        self.map_channels = [3] + [filters] * 4

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-1]
        if size == self.pooled_px:
            return x
        if size % self.pooled_px == 0:
            return F.avg_pool2d(x, size // self.pooled_px)
        return F.adaptive_avg_pool2d(x, self.pooled_px)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return pool_features(self.convs(self.pool(x)), self.pool_kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[pooled input (64 px), conv 1 (31 px), conv 2 (15), conv 3 (7), conv 4 (3)]."""
        h = self.pool(x)
        maps = [h]
        for i in range(0, len(self.convs), 3):
            h = self.convs[i : i + 3](h)
            maps.append(h)
        return maps

    def embed_maps(self, maps: list[torch.Tensor]) -> torch.Tensor:
        return self.fc(pool_features(maps[-1], self.pool_kind))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with BN and a projected shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNetTrunk(nn.Module):
    """A small ResNet (ResNet-18 layout at a quarter of the width, ~2.8 M parameters) on the full
    tile: more capacity than the reference trunk for users with GPUs."""

    def __init__(self, embedding_dim: int = 128, tile_px: int = 128, widths: tuple[int, ...] = (32, 64, 128, 256),
                 blocks: tuple[int, ...] = (2, 2, 2, 2), pool: str = "avg"):
        super().__init__()
        self.tile_px = tile_px
        self.pool_kind = pool
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        stages: list[nn.Module] = []
        cin = widths[0]
        for i, (width, count) in enumerate(zip(widths, blocks)):
            for j in range(count):
                stages.append(BasicBlock(cin, width, stride=2 if (j == 0 and i > 0) else 1))
                cin = width
        self.stages = nn.Sequential(*stages)
        self.features_dim = cin if pool == "avg" else 2 * cin
        self.fc = nn.Linear(self.features_dim, embedding_dim)
        self.stage_ends = [sum(blocks[: i + 1]) for i in range(len(blocks))]  # block index after each stage
        self.map_channels = [3] + list(widths)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return pool_features(self.stages(self.stem(x)), self.pool_kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[input at P/2, stage 1 (P/2), stage 2 (P/4), stage 3 (P/8), stage 4 (P/16)]."""
        maps = [F.avg_pool2d(x, 2)]
        h = self.stem(x)
        start = 0
        for end in self.stage_ends:
            h = self.stages[start:end](h)
            maps.append(h)
            start = end
        return maps

    def embed_maps(self, maps: list[torch.Tensor]) -> torch.Tensor:
        return self.fc(pool_features(maps[-1], self.pool_kind))


class MeanRGB(nn.Module):
    """The simplest reference point: each tile's mean colour (C = 3), no parameters."""

    features_dim = 3

    def __init__(self, embedding_dim: int = 3, tile_px: int = 128):
        super().__init__()
        if embedding_dim != 3:
            raise ValueError(f"mean-rgb has embedding_dim 3, got {embedding_dim}")
        self.tile_px = tile_px

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def build_trunk(architecture: str, embedding_dim: int, tile_px: int, pool: str | None = None) -> nn.Module:
    """A freshly initialised trunk (initialisation uses torch's global RNG: seed around it); `pool`
    None means the architecture's own (DEFAULT_POOL)."""
    if architecture == "reference":
        return ReferenceTrunk(embedding_dim, tile_px, pool=_trunk_pool(architecture, pool))
    if architecture == "resnet":
        return ResNetTrunk(embedding_dim, tile_px, pool=_trunk_pool(architecture, pool))
    if architecture == "mean-rgb":
        return MeanRGB(embedding_dim, tile_px)
    raise ValueError(f"unknown encoder architecture '{architecture}'; known: {', '.join(ARCHITECTURES)}")


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
