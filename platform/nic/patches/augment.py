"""Augmentation of whole batches of tiles as tensors, on the training device.

Working on a (N, 3, H, W) float batch in [0, 1] with per-sample random parameters keeps
augmentation off the Python-per-image path (no PIL, no torchvision) and on the GPU when there is
one. Stain augmentation follows Tellez et al. (2018): each tile's colours are taken to HED
(haematoxylin, eosin, DAB) optical-density space with scikit-image's stain matrix, each stain
channel is scaled and shifted, and the result is mapped back to RGB.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from nic.config.encoder import AugmentOptions

_EPS = 1e-6
_LOG_EPS = math.log(_EPS)
HED_BIAS_UNIT = 1.0 / -_LOG_EPS
"""`hed_bias` is in optical-density units, as in Tellez et al. (2018, 2019: "HED-light" shifts by
U(-0.05, 0.05)), whose code used scikit-image's rgb2hed before 0.19: -log(rgb) @ M. Since 0.19
rgb2hed (and `rgb_to_hed` here) divides by -log(1e-6) = 13.8, so the same bias must be scaled by
1 / 13.8. Unscaled, a bias of 0.05 was 14x the paper's: white glass turned green or cyan, tiles
magenta, and the synthetic mitosis task did not train at all (validation AUC 0.57 against 0.93 with
the bias in the paper's units, reference trunk, same data; benchmarks/results/science.md)."""


def _hed_matrices() -> tuple[np.ndarray, np.ndarray]:
    from skimage.color import hed_from_rgb, rgb_from_hed

    return np.asarray(hed_from_rgb, dtype=np.float32), np.asarray(rgb_from_hed, dtype=np.float32)


def rgb_to_hed(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB in [0, 1] -> HED stain concentrations, as skimage.color.rgb2hed (unclipped)."""
    hed_from_rgb, _ = _hed_matrices()
    m = torch.as_tensor(hed_from_rgb, device=x.device, dtype=x.dtype)
    od = torch.log(x.clamp_min(_EPS)) / _LOG_EPS
    return torch.einsum("nchw,cd->ndhw", od, m)


def hed_to_rgb(s: torch.Tensor) -> torch.Tensor:
    """Inverse of `rgb_to_hed`, clipped to [0, 1], as skimage.color.hed2rgb."""
    _, rgb_from_hed = _hed_matrices()
    m = torch.as_tensor(rgb_from_hed, device=s.device, dtype=s.dtype)
    log_rgb = torch.einsum("nchw,cd->ndhw", s * _LOG_EPS, m)
    return torch.exp(log_rgb).clamp(0, 1)


def dihedral(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Apply transform k in 0..7 of the dihedral group to each tile: k % 4 quarter turns, then a
    horizontal flip if k >= 4. Square tiles only."""
    out = x.clone()
    for code in range(1, 8):
        mask = k == code
        if not bool(mask.any()):
            continue
        part = torch.rot90(x[mask], code % 4, dims=(2, 3))
        if code >= 4:
            part = torch.flip(part, dims=(3,))
        out[mask] = part
    return out


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Blur each tile with its own sigma: separable kernels applied as one grouped convolution."""
    n, c, h, w = x.shape
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-(t[None, :] ** 2) / (2 * sigma[:, None] ** 2))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (n*c, K)
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), kernel[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def random_resized_crop(x: torch.Tensor, scale: torch.Tensor, ratio: torch.Tensor, pos: torch.Tensor,
                        mode: str = "bilinear") -> torch.Tensor:
    """Crop a window of area fraction `scale` and aspect `ratio` at relative position `pos` (N, 2)
    in [0, 1], resized back to the tile size (bilinear; nearest for label maps), per tile, with
    one grid_sample call."""
    sx = torch.sqrt(scale * ratio).clamp(max=1.0)
    sy = torch.sqrt(scale / ratio).clamp(max=1.0)
    tx = (2 * pos[:, 0] - 1) * (1 - sx)
    ty = (2 * pos[:, 1] - 1) * (1 - sy)
    theta = torch.zeros(x.shape[0], 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, tx, sy, ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="reflection", align_corners=False)


class Augmenter:
    """Random augmentation of float batches; seeded by its own generator (no global RNG state)."""

    def __init__(self, options: AugmentOptions, device: torch.device | str = "cpu", seed: int = 0,
                 crop_scale: float | None = None):
        self.options = options
        self.device = torch.device(device)
        self.crop_scale = options.crop_scale if crop_scale is None else crop_scale
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    def _uniform(self, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
        u = torch.rand(shape, generator=self.generator, device=self.device)
        return low + (high - low) * u

    def __call__(self, x: torch.Tensor, targets: torch.Tensor | None = None):
        """x: (N, 3, H, W) float in [0, 1] on `device`; returns a new augmented batch in [0, 1].

        With `targets` (N, T, H, W) per-pixel integer maps (dense tasks), returns (x, targets):
        the targets get the same crop (nearest neighbour, so ids and classes stay whole) and the
        same dihedral transform as their tile; colour changes do not touch them. The random
        draws are the same with or without targets, so patch-only batches augment as before.
        """
        o = self.options
        if not o.enabled:
            return x if targets is None else (x, targets)
        n = x.shape[0]
        if self.crop_scale < 1:
            scale = self._uniform((n,), self.crop_scale, 1.0)
            ratio = torch.exp(self._uniform((n,), math.log(3 / 4), math.log(4 / 3)))
            pos = self._uniform((n, 2), 0.0, 1.0)
            x = random_resized_crop(x, scale, ratio, pos)
            if targets is not None:
                targets = random_resized_crop(targets.float(), scale, ratio, pos, mode="nearest").to(targets.dtype)
        if o.dihedral:
            k = torch.randint(0, 8, (n,), generator=self.generator, device=self.device)
            x = dihedral(x, k)
            if targets is not None:
                targets = dihedral(targets, k)
        if o.hed_sigma > 0 or o.hed_bias > 0:
            alpha = self._uniform((n, 3, 1, 1), 1 - o.hed_sigma, 1 + o.hed_sigma)
            beta = self._uniform((n, 3, 1, 1), -o.hed_bias, o.hed_bias)
            x = hed_to_rgb(rgb_to_hed(x) * alpha + beta * HED_BIAS_UNIT)
        if o.contrast > 0 or o.brightness > 0:
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            c = self._uniform((n, 1, 1, 1), 1 - o.contrast, 1 + o.contrast)
            b = self._uniform((n, 1, 1, 1), -o.brightness, o.brightness)
            x = (x - mean) * c + mean + b
        if o.blur_prob > 0 and o.blur_sigma > 0:
            chosen = self._uniform((n,), 0.0, 1.0) < o.blur_prob
            if bool(chosen.any()):
                sigma = self._uniform((int(chosen.sum()),), min(0.1, o.blur_sigma), o.blur_sigma)
                radius = max(1, math.ceil(3 * o.blur_sigma))
                x = x.clone()
                x[chosen] = gaussian_blur(x[chosen], sigma, radius)
        if o.noise_std > 0:
            std = self._uniform((n, 1, 1, 1), 0.0, o.noise_std)
            x = x + std * torch.randn(x.shape, generator=self.generator, device=self.device)
        return x.clamp(0, 1) if targets is None else (x.clamp(0, 1), targets)


def to_float01(images: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """(N, P, P, 3) uint8 tiles -> (N, 3, P, P) float32 in [0, 1] on `device`."""
    t = torch.as_tensor(images)
    if t.dtype != torch.uint8:
        raise TypeError(f"tiles must be uint8, got {t.dtype}")
    return t.to(device).permute(0, 3, 1, 2).float().div_(255.0)
