"""Periodic textures (collagen fibres, granular cytoplasm, fat cell walls, glass noise).

A texture is computed once per process and resolution, and is periodic with period `P` px, so a
pixel's texture value depends only on its global position (seamless however a slide is cut into
regions) and costs one array slice to look up. The renderer cuts every region at multiples of P,
so each lookup is a plain view with no copy. Slides vary by offsetting their lookups.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import fft as sfft
from scipy import ndimage

from nic.synth.sprites import ANGLES

PERIOD_UM = 512.0
"""Texture period in um: large next to any structure it holds (cells are ~10 um, fat ~80 um)."""
CELL_UM = 2.0
"""Side of the cells on which tissue class is decided (pixels are painted per cell)."""
TEXTURE_SEED = 20240517
JITTER = 0.2
"""Per-cell jitter of the border warp, relative to its smooth amplitude."""
"""Textures are the same for every slide (slides differ by lookup offsets and stains)."""


def period_px(mpp: float) -> int:
    """Texture period in px at `mpp`: PERIOD_UM rounded to a multiple of the class cell."""
    cell = cell_px(mpp)
    return max(cell, int(round(PERIOD_UM / mpp / cell)) * cell)


def cell_px(mpp: float) -> int:
    return max(1, int(round(CELL_UM / mpp)))


def periodic_noise(
    rng: np.random.Generator,
    shape: int | tuple[int, int],
    sigma_px: float,
    along_px: float | None = None,
    angle: float = 0.0,
) -> np.ndarray:
    """Zero-mean, unit-std, periodic Gaussian noise of correlation length `sigma_px` (float32).

    With `along_px`, the noise is stretched to that length along `angle` (radians): streaks.
    Filtering in Fourier space costs the same for any correlation length, and wraps around.
    """
    h, w = (shape, shape) if isinstance(shape, int) else shape
    ky = (np.fft.fftfreq(h) * 2 * np.pi)[:, None].astype(np.float32)
    kx = (np.fft.rfftfreq(w) * 2 * np.pi)[None, :].astype(np.float32)
    if along_px is None:
        spectrum = np.exp(-0.5 * (kx**2 + ky**2) * sigma_px**2)
    else:
        k_par = kx * np.cos(angle) + ky * np.sin(angle)
        k_perp = -kx * np.sin(angle) + ky * np.cos(angle)
        spectrum = np.exp(-0.5 * ((k_par * along_px) ** 2 + (k_perp * sigma_px) ** 2))
    white = rng.standard_normal((h, w), dtype=np.float32)
    field = sfft.irfft2(sfft.rfft2(white) * spectrum, s=(h, w))
    field -= field.mean()
    std = field.std()
    return (field / (std if std > 0 else 1.0)).astype(np.float32)


def _fibres(rng: np.random.Generator, size: int, mpp: float) -> np.ndarray:
    """Wavy collagen bundles: streaky noise at 4 orientations, blended by slow fields, warped."""
    angles = np.linspace(0, np.pi, 4, endpoint=False)
    # bundles (~3 um wide) with fine fibrils (~1 um) running along them
    layers = [
        0.8 * periodic_noise(rng, size, 1.4 / mpp, 24.0 / mpp, a)
        + 0.6 * periodic_noise(rng, size, 0.5 / mpp, 9.0 / mpp, a)
        for a in angles
    ]
    weights = np.stack([periodic_noise(rng, size, 60.0 / mpp) for _ in layers])
    weights = np.exp(2.5 * weights)
    weights /= weights.sum(axis=0, keepdims=True)
    fib = sum(w * layer for w, layer in zip(weights, layers))
    warp_y = periodic_noise(rng, size, 25.0 / mpp) * (6.0 / mpp)
    warp_x = periodic_noise(rng, size, 25.0 / mpp) * (6.0 / mpp)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    fib = ndimage.map_coordinates(fib, [yy + warp_y, xx + warp_x], order=1, mode="grid-wrap")
    fib = (fib - fib.mean()) / fib.std()
    return fib.astype(np.float32)


def _shape_fibres(fib: np.ndarray) -> np.ndarray:
    """Eosin multiplier of stroma: bright bundles, paler matrix, and thin clefts between bundles."""
    out = np.clip(0.9 + 0.22 * fib, 0.35, 1.4)
    out *= np.where(fib < -1.8, 0.45, 1.0)  # clefts (retraction spaces) between bundles
    return out.astype(np.float32)


def _fibre_angles(fib: np.ndarray, cell: int, mpp: float, n_angles: int) -> np.ndarray:
    """Index (0..n_angles-1) of the local fibre direction per cell, from the structure tensor.

    The tensor products are averaged down to cells before smoothing, which is as good for a
    6 um smoothing scale and ~cell^2 times cheaper than smoothing at full resolution.
    """
    gy, gx = np.gradient(fib)
    n = fib.shape[0] // cell

    def cells(a: np.ndarray) -> np.ndarray:
        return a[: n * cell, : n * cell].reshape(n, cell, n, cell).mean(axis=(1, 3))

    sigma = 6.0 / mpp / cell
    jxx = ndimage.gaussian_filter(cells(gx * gx), sigma, mode="wrap")
    jyy = ndimage.gaussian_filter(cells(gy * gy), sigma, mode="wrap")
    jxy = ndimage.gaussian_filter(cells(gx * gy), sigma, mode="wrap")
    grad_angle = 0.5 * np.arctan2(2 * jxy, jxx - jyy)
    fibre_angle = (grad_angle + np.pi / 2) % np.pi
    return (np.round(fibre_angle / np.pi * n_angles).astype(np.int16) % n_angles).astype(np.int16)


def _granular(rng: np.random.Generator, size: int, mpp: float) -> np.ndarray:
    """Cytoplasm / debris texture: fine grain over patchy mid-scale variation."""
    fine = periodic_noise(rng, size, 0.6 / mpp)
    mid = periodic_noise(rng, size, 5.0 / mpp)
    out = 0.55 * fine + 0.85 * mid
    return (out / out.std()).astype(np.float32)


def _fat_walls(rng: np.random.Generator, size: int, mpp: float) -> np.ndarray:
    """Adipocyte walls: borders of a jittered Voronoi tessellation (cells ~ 70 um), 0..1."""
    n = max(2, int(round(size * mpp / 70.0)))
    step = size / n
    gy, gx = np.mgrid[0:n, 0:n].astype(np.float64)
    sy = ((gy + 0.5 + rng.uniform(-0.38, 0.38, gy.shape)) * step) % size
    sx = ((gx + 0.5 + rng.uniform(-0.38, 0.38, gx.shape)) * step) % size
    pad = int(2 * step)
    seeds = np.ones((size + 2 * pad, size + 2 * pad), bool)
    labels = np.zeros_like(seeds, dtype=np.int32)
    for oy in (-size, 0, size):
        for ox in (-size, 0, size):
            py = np.round(sy + oy + pad).astype(int)
            px = np.round(sx + ox + pad).astype(int)
            ok = (py >= 0) & (py < seeds.shape[0]) & (px >= 0) & (px < seeds.shape[1])
            seeds[py[ok], px[ok]] = False
            labels[py[ok], px[ok]] = (np.arange(n * n).reshape(n, n) + 1)[ok]
    _, (iy, ix) = ndimage.distance_transform_edt(seeds, return_indices=True)
    cell = labels[iy, ix]
    edge = np.zeros_like(seeds)
    edge[:-1] |= cell[:-1] != cell[1:]
    edge[:, :-1] |= cell[:, :-1] != cell[:, 1:]
    edge = edge[pad : pad + size, pad : pad + size].astype(np.float32)
    # bend the straight Voronoi edges so the cells look rounded, like adipocytes
    warp_y = periodic_noise(rng, size, 12.0 / mpp) * (3.0 / mpp)
    warp_x = periodic_noise(rng, size, 12.0 / mpp) * (3.0 / mpp)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    edge = ndimage.map_coordinates(edge, [yy + warp_y, xx + warp_x], order=1, mode="grid-wrap")
    wall = ndimage.gaussian_filter(edge, 0.5 / mpp, mode="wrap")
    wall = wall / max(float(wall.max()), 1e-6)
    return np.clip(wall * 1.6, 0.0, 1.0).astype(np.float32)


def _lumens(rng: np.random.Generator, size: int, mpp: float) -> np.ndarray:
    """Gland lumens of an adenocarcinoma: rounded clear spaces of ~20-50 um, 0..1 (1 = lumen)."""
    field = periodic_noise(rng, size, 9.0 / mpp) + 0.25 * periodic_noise(rng, size, 2.5 / mpp)
    threshold = np.quantile(field, 0.86)
    return np.clip((field - threshold) * 6.0, 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class TextureBank:
    """Every texture at one resolution. All share period `period` px."""

    mpp: float
    period: int
    cell: int
    fibres: np.ndarray  # eosin multiplier of stroma (shaped fibres)
    fibre_angle: np.ndarray  # int16 per cell: index of the local fibre direction (ANGLES bins)
    granular: np.ndarray
    fat_walls: np.ndarray
    lumens: np.ndarray  # 0..1, gland lumens inside tumour
    glass_noise: np.ndarray  # uint8 0..4, subtracted from RGB
    warp_y: np.ndarray  # at cell resolution (period // cell), in map px units
    warp_x: np.ndarray


BASE_MPP = 0.5
"""Finer resolutions upsample the tissue textures built at this one (4x cheaper at 0.25 um/px)."""


@functools.lru_cache(maxsize=4)
def _tissue_textures(mpp: float) -> dict[str, np.ndarray]:
    """Raw fibre, granular, fat-wall and lumen textures at `mpp` (periodic, period_px(mpp))."""
    factor = BASE_MPP / mpp
    if mpp < BASE_MPP and abs(factor - round(factor)) < 1e-9:
        base = _tissue_textures(BASE_MPP)
        f = int(round(factor))
        return {
            k: ndimage.zoom(v, f, order=1, mode="grid-wrap", grid_mode=True).astype(np.float32)
            for k, v in base.items()
        }
    rng = np.random.default_rng([TEXTURE_SEED, 1])
    size = period_px(mpp)
    return {
        "fibres": _fibres(rng, size, mpp),
        "granular": _granular(rng, size, mpp),
        "fat_walls": _fat_walls(rng, size, mpp),
        "lumens": _lumens(rng, size, mpp),
    }


@functools.lru_cache(maxsize=4)
def texture_bank(mpp: float) -> TextureBank:
    """The texture bank at `mpp` um/px (cached: a few s to build, shared by all slides of a process)."""
    tissue = _tissue_textures(mpp)
    rng = np.random.default_rng([TEXTURE_SEED, 2])
    size = period_px(mpp)
    if tissue["fibres"].shape != (size, size):
        raise RuntimeError(f"texture size {tissue['fibres'].shape} != period {size} at {mpp} um/px")
    cell = cell_px(mpp)
    ncell = size // cell
    # subtracted from RGB (uint8), so non-negative: 0..4, mean ~2
    glass = np.clip(np.round(periodic_noise(rng, size, 0.5) * 1.2 + 2.0), 0, 4).astype(np.uint8)
    warp_scale = 14.0 / CELL_UM  # boundaries wander on a ~14 um scale
    return TextureBank(
        mpp=mpp,
        period=size,
        cell=cell,
        fibres=_shape_fibres(tissue["fibres"]),
        fibre_angle=_fibre_angles(tissue["fibres"], cell, mpp, ANGLES),
        granular=tissue["granular"],
        fat_walls=tissue["fat_walls"],
        lumens=tissue["lumens"],
        glass_noise=glass,
        # smooth wander plus a per-cell jitter, so class borders are ragged rather than stepped
        warp_y=periodic_noise(rng, ncell, warp_scale) + JITTER * rng.standard_normal((ncell, ncell), np.float32),
        warp_x=periodic_noise(rng, ncell, warp_scale) + JITTER * rng.standard_normal((ncell, ncell), np.float32),
    )


def wrap_view(tex: np.ndarray, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """tex[y0:y0+h, x0:x0+w] with periodic wrap; a view when the window does not cross a period."""
    p = tex.shape[0]
    ys, xs = y0 % p, x0 % p
    if ys + h <= p and xs + w <= p:
        return tex[ys : ys + h, xs : xs + w]
    rows = np.arange(ys, ys + h) % p
    cols = np.arange(xs, xs + w) % p
    return tex[np.ix_(rows, cols)]
