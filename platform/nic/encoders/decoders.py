"""A light decoder per dense task, on the shared trunk's maps (Cerberus, Graham et al. 2023).

The decoder is a small U-Net upward path: the deepest trunk map is reduced to `width` channels,
then at every finer level it is upsampled (bilinear) to that level's size, concatenated with the
level's trunk map (a skip connection, first projected by a 1 x 1 conv to `skip_width` channels so
the 128-channel trunk maps do not make the decoder heavy) and mixed by a 3 x 3 conv, BatchNorm,
ReLU. The finest level is the tile itself at half resolution (64 px for a 128 px tile), so
boundaries between touching nuclei are drawn from pixels, not only from stride-2 features. Logits
come out at half resolution: training takes the loss there (against targets subsampled to it,
nic.encoders.dense_loss), which costs a quarter of a full-resolution loss; validation upsamples
them bilinearly to the tile size, where the metrics are measured. About 0.1 M parameters on the
reference trunk, against its 0.6 M.

Decoders exist for training only: the encoder artifact (and so the grid) holds the trunk alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DenseDecoder(nn.Module):
    """maps (finest first, as `trunk.feature_maps` returns them) -> logits (N, outputs, P, P)."""

    def __init__(self, map_channels: list[int], outputs: int, width: int = 32, skip_width: int = 16,
                 final_width: int = 16):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(map_channels[-1], width, 1, bias=False), nn.BatchNorm2d(width),
                                    nn.ReLU(inplace=True))
        self.skips = nn.ModuleList()
        self.blocks = nn.ModuleList()
        levels = list(reversed(map_channels[:-1]))  # next-deepest ... finest
        cin = width
        for i, channels in enumerate(levels):
            last = i == len(levels) - 1
            # the finest level is the RGB tile (3 channels): concatenated as it is
            proj = channels if channels <= skip_width else skip_width
            self.skips.append(nn.Identity() if proj == channels else
                              nn.Sequential(nn.Conv2d(channels, proj, 1, bias=False), nn.BatchNorm2d(proj),
                                            nn.ReLU(inplace=True)))
            cout = final_width if last else width
            self.blocks.append(_conv_bn_relu(cin + proj, cout))
            cin = cout
        self.out = nn.Conv2d(cin, outputs, 1)

    def forward(self, maps: list[torch.Tensor], out_px: int | None = None) -> torch.Tensor:
        """Logits at the finest map's size, or upsampled to `out_px`."""
        h = self.reduce(maps[-1])
        for skip_map, skip, block in zip(reversed(maps[:-1]), self.skips, self.blocks):
            h = F.interpolate(h, size=skip_map.shape[-2:], mode="bilinear", align_corners=False)
            h = block(torch.cat([h, skip(skip_map)], dim=1))
        logits = self.out(h)
        if out_px is not None and logits.shape[-1] != out_px:
            logits = F.interpolate(logits, size=(out_px, out_px), mode="bilinear", align_corners=False)
        return logits
