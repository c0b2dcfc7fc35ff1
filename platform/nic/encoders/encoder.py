"""PatchEncoder: a trunk plus its own input normalisation, the module the compression stage runs.

The encoder owns its normalisation so that a caller can only ever hand it raw uint8 tiles: the
compression stage cannot mis-normalise. In eval mode the forward runs under
`torch.inference_mode` (no autograd bookkeeping), which is what encoding millions of tiles needs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nic.encoders.architectures import build_trunk

INPUT_NORMALISATION = (
    "uint8 RGB tiles (N, 3, P, P), scaled inside the encoder to [-1, 1] as x / 127.5 - 1 "
    "(float input is taken to be RGB in [0, 1] and scaled as 2 x - 1)"
)


class PatchEncoder(nn.Module):
    """uint8 (N, 3, P, P) RGB -> float32 (N, C) embeddings."""

    def __init__(self, trunk: nn.Module, architecture: str, embedding_dim: int, tile_px: int):
        super().__init__()
        # Any: trunks are duck-typed (nic.encoders.architectures): all have `features`, the dense-capable
        # ones `feature_maps`, `embed_maps`, `fc`, `map_channels` (checked with hasattr where optional).
        self.trunk: Any = trunk
        self.architecture = architecture
        self.embedding_dim = embedding_dim
        self.tile_px = tile_px

    @property
    def pool(self) -> str | None:
        """How the trunk pools its last map (architectures.POOLS); None for mean-rgb."""
        return getattr(self.trunk, "pool_kind", None)

    @staticmethod
    def normalise(x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            return x.float().mul_(1 / 127.5).sub_(1.0)
        return x.float() * 2 - 1

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != self.tile_px or x.shape[3] != self.tile_px:
            raise ValueError(
                f"encoder expects tiles (N, 3, {self.tile_px}, {self.tile_px}), got {tuple(x.shape)}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        if self.training:
            return self.trunk(self.normalise(x))
        with torch.inference_mode():
            return self.trunk(self.normalise(x)).float()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-dense activations (used by the VAE's log-variance head); training path only."""
        return self.trunk.features(self.normalise(x))

    def maps_and_embedding(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The trunk's intermediate maps (finest first) and the embedding from the same pass, for
        dense-task decoders; training and validation path (no inference_mode)."""
        self._check(x)
        if not hasattr(self.trunk, "feature_maps"):
            raise ValueError(f"the '{self.architecture}' trunk has no feature maps: dense tasks need the "
                             "reference or resnet architecture")
        maps = self.trunk.feature_maps(self.normalise(x))
        return maps, self.trunk.embed_maps(maps)

    def head_from_features(self, f: torch.Tensor) -> torch.Tensor:
        """The trunk's dense layer applied to `features()`, so a caller can share one trunk pass."""
        return self.trunk.fc(f)


def build_encoder(architecture: str, embedding_dim: int = 128, tile_px: int = 128, seed: int | None = None,
                  pool: str | None = None) -> PatchEncoder:
    """A new encoder; with `seed`, initialised reproducibly without touching the global RNG state.
    `pool` None is the architecture's own (architectures.DEFAULT_POOL)."""
    if seed is None:
        trunk = build_trunk(architecture, embedding_dim, tile_px, pool)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            trunk = build_trunk(architecture, embedding_dim, tile_px, pool)
    return PatchEncoder(trunk, architecture, embedding_dim, tile_px)
