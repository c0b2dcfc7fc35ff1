"""Where each tissue class lies on a slide: a low-resolution map built from smooth random fields.

The map is computed once per slide at `map_um` um/px (8 um, coarser for huge slides so it stays
at most ~2048 px a side): tissue pieces on glass, tumour regions, necrotic cores, fat and stroma,
lymphocyte bands and aggregates, and the artefact masks. Two growth patterns, the slide's binary
target, differ only here:

- desmoplastic: compact tumour nests, each wrapped in a dense fibrotic rim of stroma whose outer
  half carries a band of lymphocytes, then the surrounding tissue;
- replacement: ragged, infiltrative tumour borders (with satellite nests) that touch the
  surrounding fat and stroma directly, without a rim.

The renderer never uses the class map itself: it interpolates smoothed per-class score maps (and
the continuous maps) at 2 um cells with a small domain warp, so class borders look organic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from nic.synth.params import (
    BACKGROUND,
    CLASSES,
    FAT,
    LYMPHOCYTES,
    NECROSIS,
    STROMA,
    TUMOUR,
    SlideParams,
)
from nic.synth.textures import periodic_noise

MAP_UM = 8.0
MAX_MAP_PX = 2048
K = len(CLASSES)
# Channels after the K class scores in `Layout.maps` (rendering reads the first K + 3 only).
CH_STROMA_DENSITY, CH_FOLD, CH_TIL, CH_BLUR, CH_PEN = range(K, K + 5)
N_MAIN = K + 3
PEN_INKS = {
    # optical density per unit ink in R, G, B
    "blue": (0.9, 0.55, 0.12),
    "green": (0.85, 0.2, 0.7),
    "black": (0.95, 0.9, 0.85),
}


@dataclass
class Layout:
    """Maps of one slide at `map_um` um/px; `maps[..., :K]` are smoothed class scores."""

    map_um: float
    classes: np.ndarray  # (mh, mw) uint8 class map (for statistics and tests)
    maps: np.ndarray  # (mh, mw, K + 5) float32
    has_fold: bool
    has_blur: bool
    has_pen: bool
    blur_box_um: tuple[float, float, float, float] | None  # y0, x0, y1, x1
    pen_box_um: tuple[float, float, float, float] | None

    def fractions(self) -> dict[str, float]:
        """Area fraction of each class over the tissue (background: over the slide)."""
        counts = np.bincount(self.classes.ravel(), minlength=K).astype(float)
        tissue = counts[1:].sum()
        out = {"background": counts[BACKGROUND] / counts.sum()}
        for i, name in enumerate(CLASSES[1:], start=1):
            out[name] = counts[i] / tissue if tissue else 0.0
        return out


def _noise(rng: np.random.Generator, shape: tuple[int, int], sigma_um: float, map_um: float) -> np.ndarray:
    return periodic_noise(rng, shape, max(sigma_um / map_um, 0.3))


def _quantile_threshold(values: np.ndarray, mask: np.ndarray, fraction: float) -> float:
    """Threshold so that about `fraction` of `values[mask]` lie above it."""
    if not mask.any() or fraction <= 0:
        return np.inf
    if fraction >= 1:
        return -np.inf
    return float(np.quantile(values[mask], 1.0 - fraction))


def _edt_um(mask: np.ndarray, map_um: float) -> np.ndarray:
    """Distance (um) from every True pixel to the nearest False pixel."""
    return ndimage.distance_transform_edt(mask) * map_um


def _tissue(rng, shape, yy, xx, extent_um, pieces, fraction, map_um) -> np.ndarray:
    h_um, w_um = extent_um
    size = min(h_um, w_um)
    field = np.full(shape, -np.inf, np.float32)
    for i in range(pieces):
        if pieces == 1:
            cy, cx = h_um * rng.uniform(0.42, 0.58), w_um * rng.uniform(0.42, 0.58)
            a = size * rng.uniform(0.33, 0.42)
        else:
            # spread the pieces around the slide centre
            phi = 2 * np.pi * (i / pieces) + rng.uniform(-0.4, 0.4)
            cy = h_um * (0.5 + 0.22 * np.sin(phi))
            cx = w_um * (0.5 + 0.22 * np.cos(phi))
            a = size * rng.uniform(0.2, 0.28)
        b = a * rng.uniform(0.65, 1.0)
        rot = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(rot) + (yy - cy) * np.sin(rot)
        v = -(xx - cx) * np.sin(rot) + (yy - cy) * np.cos(rot)
        field = np.maximum(field, 1.0 - np.sqrt((u / a) ** 2 + (v / b) ** 2))
    field += 0.22 * _noise(rng, shape, size * 0.07, map_um) + 0.07 * _noise(rng, shape, size * 0.015, map_um)
    # keep a margin of glass along the slide's border
    border = np.minimum(np.minimum(yy, h_um - yy), np.minimum(xx, w_um - xx))
    field -= np.clip(1.0 - border / (0.05 * size), 0.0, None) * 2.0
    # threshold for the wanted tissue fraction, but never into the glass margin
    tissue = field > max(float(np.quantile(field, 1.0 - fraction)), -0.15)
    tissue = ndimage.binary_fill_holes(tissue)
    labels, n = ndimage.label(tissue)
    if n > 1:  # drop specks smaller than 2 % of the largest piece
        sizes = ndimage.sum(tissue, labels, range(1, n + 1))
        keep = np.flatnonzero(sizes >= 0.02 * sizes.max()) + 1
        tissue = np.isin(labels, keep)
    return tissue


def _line_mask(shape, points_px: np.ndarray) -> np.ndarray:
    """Boolean map with a densely sampled polyline through `points_px` (y, x) set."""
    out = np.zeros(shape, bool)
    for (y0, x0), (y1, x1) in zip(points_px[:-1], points_px[1:]):
        n = int(max(abs(y1 - y0), abs(x1 - x0)) * 2) + 2
        ys = np.clip(np.round(np.linspace(y0, y1, n)).astype(int), 0, shape[0] - 1)
        xs = np.clip(np.round(np.linspace(x0, x1, n)).astype(int), 0, shape[1] - 1)
        out[ys, xs] = True
    return out


def _smooth_curve(rng, start, end, wiggle, n=5) -> np.ndarray:
    t = np.linspace(0, 1, n)[:, None]
    pts = start[None, :] * (1 - t) + end[None, :] * t
    normal = np.array([-(end - start)[1], (end - start)[0]]) / max(np.linalg.norm(end - start), 1e-6)
    pts = pts + normal[None, :] * rng.normal(0, wiggle, (n, 1)) * np.sin(np.pi * t)
    # Catmull-Rom-like densification by linear interpolation of a smoothed polyline
    dense = np.concatenate([np.linspace(a, b, 12, endpoint=False) for a, b in zip(pts[:-1], pts[1:])] + [pts[-1:]])
    return ndimage.gaussian_filter1d(dense, 3, axis=0, mode="nearest")


@dataclass(frozen=True)
class _MapGrid:
    """The geometry of a slide's map, shared by every step that draws on it: its pixel size, the
    slide's extent in um and each map pixel's centre in um (`yy` a column, `xx` a row)."""

    map_um: float
    h_um: float
    w_um: float
    yy: np.ndarray
    xx: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return (self.yy.shape[0], self.xx.shape[1])

    @property
    def size(self) -> float:
        """The slide's shorter side (um): what the sizes of tissue pieces and artefacts scale with."""
        return min(self.h_um, self.w_um)

    @classmethod
    def of(cls, p: SlideParams) -> _MapGrid:
        """`MAP_UM` um/px, coarser for a slide whose map would exceed `MAX_MAP_PX`, one pixel of
        margin on each side."""
        h_um, w_um = p.height * p.mpp, p.width * p.mpp
        map_um = max(MAP_UM, max(h_um, w_um) / MAX_MAP_PX)
        mh, mw = math.ceil(h_um / map_um) + 2, math.ceil(w_um / map_um) + 2
        yy = ((np.arange(mh) + 0.5) * map_um)[:, None].astype(np.float32)
        xx = ((np.arange(mw) + 0.5) * map_um)[None, :].astype(np.float32)
        return cls(map_um, h_um, w_um, yy, xx)


@dataclass
class _ClassMaps:
    """The class map being built and the continuous maps that go with it; every step of
    `build_layout` adds its class to `classes` in turn, so the order of the steps is the order in
    which classes overwrite one another."""

    tissue: np.ndarray  # (mh, mw) bool: tissue, not glass
    classes: np.ndarray  # (mh, mw) uint8
    til: np.ndarray  # (mh, mw) float32 lymphocyte density inside the tumour
    density: np.ndarray  # (mh, mw) float32 stroma density


def build_layout(p: SlideParams) -> Layout:
    """The layout of slide `p` (deterministic in p.seed)."""
    rng = np.random.default_rng(np.random.SeedSequence([p.seed, 1]))
    art_rng = np.random.default_rng(np.random.SeedSequence([p.seed, 3]))
    g = _MapGrid.of(p)
    if p.layout == "slide":
        tissue = _tissue(rng, g.shape, g.yy, g.xx, (g.h_um, g.w_um), p.tissue_pieces, p.tissue_fraction, g.map_um)
    else:
        tissue = np.ones(g.shape, bool)
    t = _ClassMaps(tissue, np.where(tissue, STROMA, BACKGROUND).astype(np.uint8),
                np.zeros(g.shape, np.float32), np.ones(g.shape, np.float32))
    if p.layout == "uniform":
        t.classes[:] = p.uniform_class
        t.til[:] = p.til_density
        t.density += 0.15 * _noise(rng, g.shape, 150.0, g.map_um)
    else:
        _tumour_and_surroundings(rng, p, g, t)

    # smoothed one-hot class scores: bilinear interpolation of these gives smooth borders
    onehot = np.stack([(t.classes == k).astype(np.float32) for k in range(K)], axis=-1)
    scores = ndimage.gaussian_filter(onehot, sigma=(0.7, 0.7, 0), mode="nearest")
    extra = np.zeros((*g.shape, 5), np.float32)
    extra[..., CH_TIL - K] = t.til
    extra[..., CH_STROMA_DENSITY - K] = ndimage.gaussian_filter(t.density, 1.0)

    # Artefacts draw from their own stream, in a fixed order, so turning one on moves no tissue.
    has_fold = p.artefacts.fold and bool(tissue.any())
    if has_fold:
        extra[..., CH_FOLD - K] = _fold(art_rng, g, tissue)
    blur_box = None
    if p.artefacts.blur and tissue.any():
        extra[..., CH_BLUR - K], blur_box = _blur(art_rng, g, tissue)
    pen_box = None
    if p.artefacts.pen:
        extra[..., CH_PEN - K], pen_box = _pen(art_rng, g)
    maps = np.concatenate([scores, extra], axis=-1).astype(np.float32)
    return Layout(
        map_um=g.map_um,
        classes=t.classes,
        maps=np.ascontiguousarray(maps),
        has_fold=has_fold,
        has_blur=blur_box is not None,
        has_pen=pen_box is not None,
        blur_box_um=blur_box,
        pen_box_um=pen_box,
    )


def _tumour_and_surroundings(rng: np.random.Generator, p: SlideParams, g: _MapGrid, t: _ClassMaps) -> None:
    """The classes of a `slide` or `fill` layout, in the order they overwrite one another: the
    tumour's extent, fat and the desmoplastic rim around it, lymphoid aggregates, then the tumour
    itself with its septa and necrotic cores, and the lymphocyte density. One `rng`, drawn in this
    order: the same seed gives the same slide."""
    tumour = _tumour_mask(rng, p, g, t.tissue)
    normal = t.tissue & ~tumour
    d_out = _surroundings(rng, p, g, t, tumour, normal)
    _aggregates(rng, p, g, t, tumour, normal, d_out)
    _tumour_interior(rng, p, g, t, tumour)
    # tumour-infiltrating lymphocytes: strongest near the tumour border
    til_field = np.clip(0.55 + 0.45 * _noise(rng, g.shape, 60.0, g.map_um), 0.0, 1.0)
    t.til = (p.til_density * til_field * (0.35 + np.exp(-d_out / 120.0))).astype(np.float32)
    t.til[~t.tissue] = 0.0


def _tumour_mask(rng: np.random.Generator, p: SlideParams, g: _MapGrid, tissue: np.ndarray) -> np.ndarray:
    """Where the tumour lies: a smooth field, deeper in the tissue more likely, thresholded for
    `tumour_fraction`. The growth pattern shows here first: compact nests (desmoplastic) or ragged
    borders with satellites (replacement)."""
    depth = _edt_um(np.pad(tissue, 1), g.map_um)[1:-1, 1:-1]
    desmo = p.growth_pattern == "desmoplastic"
    scale = rng.uniform(140.0, 260.0) * (1.0 if desmo else 0.8)
    t_field = _noise(rng, g.shape, scale, g.map_um)
    if not desmo:  # ragged, infiltrative borders and satellite nests
        t_field += 0.55 * _noise(rng, g.shape, 30.0, g.map_um) + 0.25 * _noise(rng, g.shape, 12.0, g.map_um)
    t_field += 0.9 * np.clip(depth / max(0.18 * g.size, 1.0), 0.0, 1.0)
    tumour = tissue & (t_field > _quantile_threshold(t_field, tissue, p.tumour_fraction))
    return ndimage.binary_opening(tumour, iterations=1) if desmo else tumour


def _surroundings(rng: np.random.Generator, p: SlideParams, g: _MapGrid, t: _ClassMaps, tumour: np.ndarray,
                  normal: np.ndarray) -> np.ndarray:
    """Fat and stroma in the non-tumour tissue and, for the desmoplastic pattern, the fibrotic rim
    around the tumour with its band of lymphocytes (the binary target's signal); returns each
    pixel's distance (um) from the tumour, which the later steps place things by."""
    f_field = _noise(rng, g.shape, 110.0, g.map_um) + 0.3 * _noise(rng, g.shape, 30.0, g.map_um)
    fat = normal & (f_field > _quantile_threshold(f_field, normal, p.fat_fraction))
    t.classes[fat] = FAT
    t.density += 0.18 * _noise(rng, g.shape, 120.0, g.map_um)

    d_out = _edt_um(~tumour, g.map_um)
    lymph_noise = _noise(rng, g.shape, 35.0, g.map_um)
    if p.growth_pattern == "desmoplastic" and tumour.any():
        rim_um = rng.uniform(110.0, 190.0)
        rim = t.tissue & ~tumour & (d_out <= rim_um)
        t.classes[rim] = STROMA
        t.density[rim] = 1.15 + 0.1 * np.clip(lymph_noise[rim], -1, 1)
        band = t.tissue & ~tumour & (d_out > 0.45 * rim_um) & (d_out <= 1.05 * rim_um)
        coverage = 0.35 + 0.6 * p.til_density
        lymph_band = band & (lymph_noise > _quantile_threshold(lymph_noise, band, coverage))
        t.classes[lymph_band] = LYMPHOCYTES
    return d_out


def _aggregates(rng: np.random.Generator, p: SlideParams, g: _MapGrid, t: _ClassMaps, tumour: np.ndarray,
                normal: np.ndarray, d_out: np.ndarray) -> None:
    """Lymphoid aggregates in the surrounding tissue, more of them with a higher TIL density, kept
    away from the tumour so they do not read as the desmoplastic band."""
    area_mm2 = float(t.tissue.sum()) * (g.map_um / 1000.0) ** 2
    n_agg = rng.poisson((0.5 + 3.0 * p.til_density) * max(area_mm2, 0.5) / 4.0)
    agg_noise = _noise(rng, g.shape, 15.0, g.map_um)
    candidates = np.argwhere(normal & (d_out > 60.0))
    for _ in range(int(n_agg)):
        if len(candidates) == 0:
            break
        cy, cx = candidates[rng.integers(len(candidates))]
        r_um = rng.uniform(35.0, 110.0)
        d = np.hypot(g.yy[:, 0][:, None] - (cy + 0.5) * g.map_um, g.xx[0][None, :] - (cx + 0.5) * g.map_um)
        blob = t.tissue & ~tumour & (d < r_um * (1.0 + 0.25 * agg_noise))
        t.classes[blob] = LYMPHOCYTES


def _tumour_interior(rng: np.random.Generator, p: SlideParams, g: _MapGrid, t: _ClassMaps,
                     tumour: np.ndarray) -> None:
    """The tumour class, then what lies inside it: thin fibrovascular septa between nests and
    necrotic cores away from the border, sized for `necrosis_fraction` of the tumour."""
    t.classes[tumour] = TUMOUR
    # thin fibrovascular septa between tumour nests
    septa_field = _noise(rng, g.shape, 45.0, g.map_um)
    septa = tumour & (np.abs(septa_field) < (0.07 if p.growth_pattern == "desmoplastic" else 0.05))
    t.classes[septa] = STROMA
    # necrotic cores, away from the tumour border
    d_in = _edt_um(tumour, g.map_um)
    n_field = _noise(rng, g.shape, 70.0, g.map_um) + d_in / 150.0
    core = tumour & (d_in > 50.0)
    wanted = p.necrosis_fraction * tumour.sum() / max(core.sum(), 1)
    necrosis = core & (n_field > _quantile_threshold(n_field, core, min(1.0, wanted)))
    t.classes[necrosis] = NECROSIS


def _fold(art_rng: np.random.Generator, g: _MapGrid, tissue: np.ndarray) -> np.ndarray:
    """A tissue fold: a band along a gently curved line through the tissue's centre (the fold
    channel, smoothed), for artefact detection to find."""
    size, map_um = g.size, g.map_um
    ty, tx = np.argwhere(tissue).mean(axis=0) * map_um
    ang = art_rng.uniform(0, np.pi)
    half = size * 0.45
    start = np.array([ty - half * np.sin(ang), tx - half * np.cos(ang)])
    end = np.array([ty + half * np.sin(ang), tx + half * np.cos(ang)])
    curve = _smooth_curve(art_rng, start, end, size * 0.06) / map_um
    d = ndimage.distance_transform_edt(~_line_mask(g.shape, curve)) * map_um
    width = art_rng.uniform(50.0, 130.0)
    fold = np.clip((width / 2 - d) / 12.0 + 0.5, 0, 1) * tissue
    return ndimage.gaussian_filter(fold.astype(np.float32), 0.7)


def _blur(art_rng: np.random.Generator, g: _MapGrid,
          tissue: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """An out-of-focus disc centred on a tissue pixel: the blur channel and its box (um), which
    the sidecar records so a test can check that tiling flags it."""
    cy, cx = np.argwhere(tissue)[art_rng.integers(tissue.sum())] * g.map_um
    r = g.size * art_rng.uniform(0.12, 0.25)
    d = np.hypot(g.yy - cy, g.xx - cx) / r
    blur = np.clip((1.0 - d) * 4.0, 0, 1) * (1 + 0.0 * g.yy)
    return blur, (cy - r, cx - r, cy + r, cx + r)


def _pen(art_rng: np.random.Generator,
         g: _MapGrid) -> tuple[np.ndarray, tuple[float, float, float, float] | None]:
    """A pen stroke from one edge of the slide inwards: the pen channel and its box (um; None
    when the stroke misses the map)."""
    size, map_um, h_um, w_um = g.size, g.map_um, g.h_um, g.w_um
    side = art_rng.integers(4)
    t0, t1 = art_rng.uniform(0.1, 0.9, 2)
    corners = {
        0: (np.array([0.0, t0 * w_um]), np.array([h_um * art_rng.uniform(0.3, 0.7), t1 * w_um])),
        1: (np.array([h_um, t0 * w_um]), np.array([h_um * art_rng.uniform(0.3, 0.7), t1 * w_um])),
        2: (np.array([t0 * h_um, 0.0]), np.array([t1 * h_um, w_um * art_rng.uniform(0.3, 0.7)])),
        3: (np.array([t0 * h_um, w_um]), np.array([t1 * h_um, w_um * art_rng.uniform(0.3, 0.7)])),
    }
    start, end = corners[int(side)]
    curve = _smooth_curve(art_rng, start, end, size * 0.08) / map_um
    d = ndimage.distance_transform_edt(~_line_mask(g.shape, curve)) * map_um
    width = size * art_rng.uniform(0.02, 0.045)
    pen = np.clip((width / 2 - d) / (0.15 * width) + 0.5, 0, 1).astype(np.float32)
    pen *= np.clip(0.85 + 0.15 * _noise(art_rng, g.shape, 40.0, map_um), 0.5, 1.0)
    ys, xs = np.nonzero(pen > 0)
    pen_box = None
    if len(ys):
        pen_box = (ys.min() * map_um - map_um, xs.min() * map_um - map_um,
                   (ys.max() + 2) * map_um, (xs.max() + 2) * map_um)
    return pen, pen_box
