"""Precomputed nucleus sprites: haematoxylin-concentration stamps, one bank per kind and resolution.

Rendering millions of nuclei one by one from a shape model would dominate the cost of a slide, so
each kind of nucleus is drawn once as a bank of varied sprites (shape, size, chromatin, darkness),
and the renderer only stamps them (an elementwise max on a small window). Sizes are in um and
converted at the slide's resolution, so a 0.25 um/px slide shows the same cells twice as large.

Most kinds are a haematoxylin stamp only. Apoptotic bodies also carry an eosin stamp (their
shrunken, hypereosinophilic cytoplasm) and a "clear" mask (the retraction halo that separates them
from their neighbours), which the renderer applies before stamping nuclei; mitotic figures carry
the same pair for their rounded cell (a wide pale clear zone, a faint pink).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

SPRITE_SEED = 77031
VARIANTS = 48
# New kinds go at the end: a kind's index seeds its bank and is stored in nuclei arrays.
KINDS = ("tumour", "lymphocyte", "fibroblast", "fat", "debris", "mitosis", "apoptotic")
ANGLES = 12  # orientations of elongated (spindle) nuclei


@dataclass(frozen=True)
class SpriteBank:
    """`sprites[i]` is a (size, size) float32 H-concentration stamp centred at (size // 2, size // 2).

    For oriented kinds, variant i has angle `angles[i]` (radians, in [0, pi)). Kinds that change
    the cytoplasm around the nucleus (apoptotic bodies) also have `eosin[i]`, an E-concentration
    stamp (elementwise max), and `clear[i]` in 0..1, the fraction of the surrounding stain removed
    (a pale halo); both are None for the other kinds.
    """

    kind: str
    sprites: np.ndarray
    angles: np.ndarray | None = None
    eosin: np.ndarray | None = None
    clear: np.ndarray | None = None

    @property
    def size(self) -> int:
        return self.sprites.shape[1]

    @property
    def half(self) -> int:
        return self.sprites.shape[1] // 2


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = size // 2
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy - c, xx - c


def _smooth_inside(dist_px: np.ndarray) -> np.ndarray:
    """Anti-aliased inside mask from a signed distance (px, positive inside)."""
    return np.clip(dist_px + 0.5, 0.0, 1.0)


def _blob(
    rng: np.random.Generator,
    size: int,
    a_px: float,
    b_px: float,
    angle: float,
    irregularity: float,
    dy: float = 0.0,
    dx: float = 0.0,
    spindle: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(inside mask 0..1, normalised radius) of a perturbed ellipse centred at (dy, dx)."""
    yy, xx = _grid(size)
    yy, xx = yy - dy, xx - dx
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = -xx * np.sin(angle) + yy * np.cos(angle)
    if spindle:
        # Tapered ends: the half-width shrinks towards the tips.
        taper = np.clip(1.0 - (u / a_px) ** 2, 0.0, 1.0) ** 0.35
        r = np.sqrt((u / a_px) ** 2 + (v / (b_px * np.maximum(taper, 0.15))) ** 2)
    else:
        r = np.sqrt((u / a_px) ** 2 + (v / b_px) ** 2)
    theta = np.arctan2(v, u)
    boundary = np.ones_like(r)
    for k in range(2, 6):
        boundary += irregularity * rng.normal() / k**0.5 * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    mean_radius_px = 0.5 * (a_px + b_px)
    inside = _smooth_inside((boundary - r) * mean_radius_px)
    return inside, r / np.maximum(boundary, 1e-3)


def _chromatin(rng: np.random.Generator, size: int, grain_px: float) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), grain_px)
    return noise / (noise.std() + 1e-6)


def _size_px(um: float, mpp: float) -> float:
    return um / mpp


def _tumour(rng: np.random.Generator, mpp: float, size: int) -> np.ndarray:
    a = _size_px(rng.uniform(3.6, 5.6), mpp)
    b = a * rng.uniform(0.65, 0.95)
    inside, r = _blob(rng, size, a, b, rng.uniform(0, np.pi), rng.uniform(0.05, 0.14))
    chrom = _chromatin(rng, size, 0.45 / mpp)
    base = rng.uniform(0.85, 1.25)
    rim = rng.uniform(0.2, 0.5) * np.clip(r, 0, 1) ** 4  # vesicular: chromatin along the membrane
    val = base * (1.0 + 0.22 * chrom + rim)
    yy, xx = _grid(size)
    for _ in range(rng.integers(1, 3)):  # nucleoli
        ny, nx = rng.uniform(-0.4, 0.4, 2) * b
        rr = np.hypot(yy - ny, xx - nx)
        val = np.maximum(val, rng.uniform(2.2, 2.8) * _smooth_inside(_size_px(0.7, mpp) - rr))
    return (val * inside).astype(np.float32)


def _lymphocyte(rng: np.random.Generator, mpp: float, size: int) -> np.ndarray:
    a = _size_px(rng.uniform(2.4, 3.2), mpp)
    b = a * rng.uniform(0.85, 1.0)
    inside, r = _blob(rng, size, a, b, rng.uniform(0, np.pi), 0.05)
    chrom = _chromatin(rng, size, 0.4 / mpp)
    val = rng.uniform(2.2, 2.7) * (1.0 + 0.1 * chrom) * (1.0 - 0.15 * np.clip(r, 0, 1) ** 6)
    return (val * inside).astype(np.float32)


def _fibroblast(rng: np.random.Generator, mpp: float, size: int, angle: float) -> np.ndarray:
    a = _size_px(rng.uniform(5.0, 8.5), mpp)
    b = _size_px(rng.uniform(0.9, 1.6), mpp)
    inside, _ = _blob(rng, size, a, b, angle + rng.normal(0, 0.08), 0.05, spindle=True)
    chrom = _chromatin(rng, size, 0.4 / mpp)
    val = rng.uniform(1.5, 2.1) * (1.0 + 0.12 * chrom)
    return (val * inside).astype(np.float32)


def _fat_nucleus(rng: np.random.Generator, mpp: float, size: int, angle: float) -> np.ndarray:
    a = _size_px(rng.uniform(3.5, 5.5), mpp)
    b = _size_px(rng.uniform(0.7, 1.1), mpp)
    inside, _ = _blob(rng, size, a, b, angle, 0.04, spindle=True)
    return (rng.uniform(1.3, 1.8) * inside).astype(np.float32)


def _debris(rng: np.random.Generator, mpp: float, size: int) -> np.ndarray:
    """Necrotic debris: a cluster of karyorrhectic fragments over a faint ghost nucleus."""
    yy, xx = _grid(size)
    ghost, _ = _blob(rng, size, _size_px(rng.uniform(3.5, 5.5), mpp), _size_px(rng.uniform(2.5, 4.5), mpp),
                     rng.uniform(0, np.pi), 0.25)
    val = ghost * rng.uniform(0.25, 0.55)
    for _ in range(rng.integers(1, 7)):
        cy, cx = rng.normal(0, _size_px(2.0, mpp), 2)
        rad = _size_px(rng.uniform(0.4, 1.2), mpp)
        dot = _smooth_inside(rad - np.hypot(yy - cy, xx - cx))
        val = np.maximum(val, rng.uniform(2.0, 3.0) * dot)
    return val.astype(np.float32)


def mitosis_scale(snr: float) -> float:
    """Linear size of mitotic figures relative to snr ~0.75 (0.6 at snr 0, 1.15 at snr 1)."""
    return 0.6 + 0.55 * snr


def _mitosis(rng: np.random.Generator, mpp: float, size: int, snr: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A mitotic figure in its rounded cell: (H, E, clear) stamps.

    Chromosomes as dark rods, on a metaphase plate (60 %) or clustered, with fine hair-like
    projections at the edge of the mass and no nuclear membrane; around them the cell has rounded
    up and its cytoplasm is pale (a wide clear zone with only a faint pink), which is what a
    pathologist scans for. An apoptotic body, the classic look-alike, is instead round and smooth
    (no projections), in dense pink cytoplasm inside a thin halo; a lymphocyte is round, smooth and
    has no clear zone at all.

    `snr` (0..1) scales size, darkness and the clear zone: at 1 a large near-black plate in a pale
    cell; at 0 a small clump about as dark as a tumour nucleus, with hardly any clearing.
    """
    yy, xx = _grid(size)
    scale = mitosis_scale(snr)
    dark = 1.8 + 1.6 * snr
    length = _size_px(rng.uniform(5.5, 9.0) * scale, mpp)
    width = _size_px(rng.uniform(1.4, 2.6) * scale, mpp)
    angle = rng.uniform(0, np.pi)
    metaphase = rng.random() < 0.6
    val = np.zeros((size, size), np.float32)
    n = int(rng.integers(12, 26))
    for _ in range(n):
        if metaphase:
            t = rng.uniform(-0.5, 0.5) * length
            s = rng.normal(0, 0.25) * width
        else:
            t, s = rng.normal(0, 0.28 * length, 2)
        cy = t * np.sin(angle) + s * np.cos(angle)
        cx = t * np.cos(angle) - s * np.sin(angle)
        ca = rng.uniform(0, np.pi)
        ra = _size_px(rng.uniform(0.7, 1.4) * scale, mpp)
        rb = _size_px(rng.uniform(0.35, 0.6) * scale, mpp)
        u = (xx - cx) * np.cos(ca) + (yy - cy) * np.sin(ca)
        v = -(xx - cx) * np.sin(ca) + (yy - cy) * np.cos(ca)
        d = (1.0 - np.sqrt((u / ra) ** 2 + (v / rb) ** 2)) * rb
        val = np.maximum(val, dark * rng.uniform(0.85, 1.1) * _smooth_inside(d))
    # hair-like projections: thin chromosome arms reaching out of the mass, roughly radially
    for _ in range(int(rng.integers(6, 12))):
        phi = rng.uniform(0, 2 * np.pi)
        t = rng.uniform(-0.5, 0.5) * length if metaphase else rng.normal(0, 0.2 * length)
        base_y = t * np.sin(angle) + np.sin(phi) * 0.4 * width
        base_x = t * np.cos(angle) + np.cos(phi) * 0.4 * width
        arm = _size_px(rng.uniform(1.0, 2.2) * scale, mpp)
        thick = _size_px(rng.uniform(0.25, 0.4) * scale, mpp)
        cy, cx = base_y + 0.5 * arm * np.sin(phi), base_x + 0.5 * arm * np.cos(phi)
        u = (xx - cx) * np.cos(phi) + (yy - cy) * np.sin(phi)
        v = -(xx - cx) * np.sin(phi) + (yy - cy) * np.cos(phi)
        d = np.minimum(0.5 * arm - np.abs(u), thick - np.abs(v))
        val = np.maximum(val, dark * rng.uniform(0.75, 1.0) * _smooth_inside(d))
    # the rounded cell: a pale clear zone reaching past the chromosomes, with a faint pink
    cell_px = 0.5 * length + _size_px(rng.uniform(1.5, 2.5) * scale, mpp)
    cell, _ = _blob(rng, size, cell_px, cell_px * rng.uniform(0.85, 1.0), rng.uniform(0, np.pi), 0.05)
    clear = (0.25 + 0.4 * snr) * rng.uniform(0.85, 1.1) * cell
    eosin = rng.uniform(0.15, 0.3) * cell
    blur = 0.25 / mpp
    return (
        ndimage.gaussian_filter(val, blur).astype(np.float32),
        ndimage.gaussian_filter(eosin, blur).astype(np.float32),
        ndimage.gaussian_filter(np.clip(clear, 0.0, 0.9), blur).astype(np.float32),
    )


def _apoptotic(rng: np.random.Generator, mpp: float, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An apoptotic body, the classic mitosis look-alike: (H, E, clear) stamps.

    A shrunken round cell of dense pink (hypereosinophilic) cytoplasm, 5-7.5 um across, inside a
    pale retraction halo, holding either one small, round, homogeneously near-black pyknotic
    nucleus (40 %) or two to four round karyorrhectic fragments. Like a mitotic figure it is small
    and very dark; unlike one it is round and smooth, with no chromosome arms, and sits in a halo.
    """
    yy, xx = _grid(size)
    cell_um = rng.uniform(2.5, 3.8)
    cell, _ = _blob(rng, size, _size_px(cell_um, mpp), _size_px(cell_um * rng.uniform(0.8, 1.0), mpp),
                    rng.uniform(0, np.pi), 0.06)
    halo_px = _size_px(cell_um + rng.uniform(0.8, 1.6), mpp)
    halo, _ = _blob(rng, size, halo_px, halo_px * rng.uniform(0.85, 1.0), rng.uniform(0, np.pi), 0.08)
    clear = rng.uniform(0.55, 0.85) * halo
    eosin = rng.uniform(0.6, 1.0) * cell
    val = np.zeros((size, size), np.float32)
    pyknotic = rng.random() < 0.4
    pieces = 1 if pyknotic else int(rng.integers(2, 5))
    for _ in range(pieces):
        rad_um = rng.uniform(1.2, 2.0) if pyknotic else rng.uniform(0.6, 1.2)
        reach = _size_px(max(0.0, cell_um - rad_um - 0.3), mpp)
        cy, cx = rng.uniform(-0.5, 0.5, 2) * reach if pyknotic else rng.uniform(-0.7, 0.7, 2) * reach
        dot = _smooth_inside(_size_px(rad_um, mpp) - np.hypot(yy - cy, xx - cx))
        val = np.maximum(val, rng.uniform(2.6, 3.2) * dot)
    blur = 0.2 / mpp
    return (
        ndimage.gaussian_filter(val, blur).astype(np.float32),
        ndimage.gaussian_filter(eosin, blur).astype(np.float32),
        ndimage.gaussian_filter(clear, blur).astype(np.float32),
    )


def _sprite_size(max_radius_um: float, mpp: float) -> int:
    return int(np.ceil(2 * max_radius_um / mpp)) | 1


@functools.lru_cache(maxsize=16)
def sprite_bank(kind: str, mpp: float, snr: float = 1.0) -> SpriteBank:
    """The bank of `kind` (tumour, lymphocyte, fibroblast, fat, debris, mitosis, apoptotic) at `mpp`."""
    if kind not in KINDS:
        raise ValueError(f"unknown nucleus kind {kind!r}; known: {', '.join(KINDS)}")
    # Seeded by kind index, not hash(kind): str hashes change between processes.
    rng = np.random.default_rng([SPRITE_SEED, KINDS.index(kind), int(round(mpp * 1000)), int(round(snr * 1000))])
    angles = eosin = clear = None
    sprites: list[np.ndarray] | np.ndarray
    if kind == "tumour":
        size = _sprite_size(8.0, mpp)
        sprites = [_tumour(rng, mpp, size) for _ in range(VARIANTS)]
    elif kind == "lymphocyte":
        size = _sprite_size(4.0, mpp)
        sprites = [_lymphocyte(rng, mpp, size) for _ in range(VARIANTS)]
    elif kind in ("fibroblast", "fat"):
        size = _sprite_size(9.5 if kind == "fibroblast" else 6.5, mpp)
        angles = np.repeat(np.arange(ANGLES) * np.pi / ANGLES, VARIANTS // ANGLES)
        make = _fibroblast if kind == "fibroblast" else _fat_nucleus
        sprites = [make(rng, mpp, size, a) for a in angles]
    elif kind == "debris":
        size = _sprite_size(7.5, mpp)
        sprites = [_debris(rng, mpp, size) for _ in range(VARIANTS)]
    elif kind == "mitosis":
        size = _sprite_size(9.0, mpp)
        sprites, eosin, clear = (np.stack(v) for v in zip(*(_mitosis(rng, mpp, size, snr) for _ in range(VARIANTS))))
    else:  # apoptotic
        size = _sprite_size(6.5, mpp)
        sprites, eosin, clear = (np.stack(v) for v in zip(*(_apoptotic(rng, mpp, size) for _ in range(VARIANTS))))
    return SpriteBank(kind=kind, sprites=np.stack(list(sprites)).astype(np.float32), angles=angles, eosin=eosin,
                      clear=clear)
