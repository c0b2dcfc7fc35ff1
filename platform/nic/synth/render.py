"""Rendering an H&E-like slide region from its hidden parameters.

`Scene(params).render(y0, x0, h, w)` returns the level-0 RGB pixels of any region, and the same
pixel always gets the same value however the slide is cut into regions (textures are periodic in
global coordinates, nuclei come from fixed blocks with their own seeds, blur renders a margin).
That is what lets the TIFF writer stream a 100,000 px slide band by band.

How a region is painted, fast enough for ~20 Mpx/s on one core:
1. tissue class per 2 um cell: smoothed class scores of the layout, bilinearly interpolated at
   warped cell centres, argmax;
2. stain concentrations per pixel: eosin and haematoxylin from per-class coefficients (per cell)
   times periodic textures (collagen fibres, granular cytoplasm, fat walls);
3. nuclei: precomputed sprites stamped (elementwise max) into the haematoxylin map; which nuclei
   exist is decided per 256 um block from the class at each candidate position; a tumour nucleus
   becomes a mitotic figure with probability `mitotic_fraction`, else an apoptotic body (a dark
   look-alike with a pale halo and pink cytoplasm, also stamped into eosin) with `apoptotic_fraction`;
4. colour: a 256 x 256 Beer-Lambert lookup table of the slide's stain, plus glass noise;
5. artefacts: tissue folds (denser stain), out-of-focus areas (blur), pen ink on top.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from nic.synth.layout import (
    CH_BLUR,
    CH_FOLD,
    CH_PEN,
    CH_STROMA_DENSITY,
    CH_TIL,
    N_MAIN,
    PEN_INKS,
    K,
    Layout,
    build_layout,
)
from nic.synth.params import (
    FAT,
    LYMPHOCYTES,
    NECROSIS,
    STROMA,
    TUMOUR,
    SlideParams,
)
from nic.synth.sprites import ANGLES, VARIANTS, SpriteBank, sprite_bank
from nic.synth.stain import E_MAX, H_MAX
from nic.synth.textures import TextureBank, texture_bank, wrap_view

# Indices are stored in nuclei arrays and seed the sprite banks: new kinds go at the end.
KINDS = ("tumour", "lymphocyte", "fibroblast", "fat", "debris", "mitosis", "apoptotic")
KIND_TUMOUR, KIND_LYMPHOCYTE, KIND_FIBROBLAST, KIND_FAT, KIND_DEBRIS, KIND_MITOSIS, KIND_APOPTOTIC = range(len(KINDS))
BLOCK_UM = 256.0
WARP_UM = 6.0
MAX_CHUNK = 1024
FOLD_GAIN = 0.85  # a fold doubles the section: stain density x (1 + gain)


@dataclass(frozen=True)
class NucleusSpec:
    """How nuclei of one kind are placed: a jittered grid (dense, even packing) or Poisson."""

    kind: int
    spacing_um: float | None  # jittered grid spacing; None = Poisson
    density_per_mm2: float  # Poisson density (ignored for grids)
    accept: tuple[float, ...]  # acceptance probability per tissue class
    til_accept: tuple[float, ...] = (0.0,) * K  # extra acceptance x local TIL density


NUCLEI = (
    NucleusSpec(KIND_TUMOUR, 10.5, 0.0, (0, 0, 0.88, 0, 0, 0)),
    NucleusSpec(KIND_LYMPHOCYTE, 6.6, 0.0, (0, 0.006, 0.0, 0.8, 0.01, 0.002), (0, 0.2, 0.16, 0, 0, 0.02)),
    NucleusSpec(KIND_FIBROBLAST, None, 1500.0, (0, 0.9, 0, 0.15, 0, 0)),
    NucleusSpec(KIND_FAT, None, 90.0, (0, 0, 0, 0, 0, 1.0)),
    NucleusSpec(KIND_DEBRIS, None, 7000.0, (0, 0, 0, 0, 1.0, 0)),
)


_ACCEPT = np.array([spec.accept for spec in NUCLEI], np.float32)
_TIL_ACCEPT = np.array([spec.til_accept for spec in NUCLEI], np.float32)
_KIND = np.array([spec.kind for spec in NUCLEI], np.int64)


def _class_coefficients(p: SlideParams) -> dict[str, np.ndarray]:
    """Per-class stain coefficients: E = fib*FIB + gran*GRAN + fat*WALL + e0, H = hgran*GRAN + h0."""
    a = p.appearance
    z = np.zeros(K, np.float32)
    co = {name: z.copy() for name in ("fib", "gran", "fat", "e0", "hgran", "h0", "lumen")}
    co["lumen"][TUMOUR] = 0.92 * a.glands
    co["fib"][STROMA] = a.stroma_e
    co["gran"][STROMA] = 0.03
    co["h0"][STROMA] = 0.05
    co["gran"][TUMOUR] = 0.09
    co["e0"][TUMOUR] = a.tumour_e
    co["hgran"][TUMOUR] = 0.06
    co["h0"][TUMOUR] = a.tumour_h
    co["gran"][LYMPHOCYTES] = 0.05
    co["e0"][LYMPHOCYTES] = 0.3
    co["h0"][LYMPHOCYTES] = 0.2
    co["hgran"][LYMPHOCYTES] = 0.03
    co["gran"][NECROSIS] = 0.2
    co["e0"][NECROSIS] = a.necrosis_e
    co["hgran"][NECROSIS] = 0.1
    co["h0"][NECROSIS] = 0.16
    co["fat"][FAT] = a.fat_wall_e
    co["fib"][FAT] = 0.02
    return co


class Scene:
    """A slide that can render any of its regions. Thread-safe (for a multi-threaded writer)."""

    def __init__(
        self,
        params: SlideParams,
        layout: Layout | None = None,
        extra_nuclei: np.ndarray | None = None,
    ):
        self.params = params
        self.mpp = params.mpp
        self.width, self.height = params.width, params.height
        self.layout = layout if layout is not None else build_layout(params)
        self.tex: TextureBank = texture_bank(params.mpp)
        self.cell = self.tex.cell
        self.period = self.tex.period
        c = self.cell
        self.offset = tuple((int(round(v / self.mpp)) // c * c) % self.period for v in params.texture_offset)
        self.lut = params.stain.lut()
        self.glass = self.lut[0]
        # RGB packed in uint32 (alpha unused): a 1-D gather of words is ~3x faster than of rows
        self._lut32 = np.concatenate([self.lut, np.zeros((len(self.lut), 1), np.uint8)], axis=1).view(np.uint32).ravel()
        self.banks: list[SpriteBank] = [
            sprite_bank(kind, self.mpp, params.snr if kind == "mitosis" else 1.0) for kind in KINDS
        ]
        self.max_half = max(b.half for b in self.banks)
        # sprites and coefficients in lookup-table units (0..255), see _chunk
        h_unit = 255.0 / H_MAX
        nuclear = params.appearance.nuclear_scale
        self.sprites = [(b.sprites * (h_unit * nuclear)).astype(np.float32) for b in self.banks]
        # kinds that also change the cytoplasm around them (apoptotic bodies, mitotic cells): E stamp and halo
        e_unit = 255.0 / E_MAX
        self.eosin = [None if b.eosin is None else (b.eosin * e_unit).astype(np.float32) for b in self.banks]
        self.clear = [None if b.clear is None else (1.0 - b.clear).astype(np.float32) for b in self.banks]
        self._halo_kinds = np.array([k for k, b in enumerate(self.banks) if b.clear is not None], np.int32)
        self.halves = [b.half for b in self.banks]
        self.sizes = [b.size for b in self.banks]
        self.block = max(c, int(round(BLOCK_UM / self.mpp)))
        units = {"h0": 255.0 / H_MAX, "hgran": 255.0 / H_MAX, "lumen": 1.0}
        self.coef = {
            name: (v * units.get(name, 255.0 / E_MAX)).astype(np.float32)
            for name, v in _class_coefficients(params).items()
        }
        self.extra = (
            np.asarray(extra_nuclei, np.int32).reshape(-1, 4) if extra_nuclei is not None else np.zeros((0, 4), np.int32)
        )
        self._map_scale = c * self.mpp / self.layout.map_um  # map px per cell
        self._warp = WARP_UM / self.layout.map_um
        self._warp_y = (self.tex.warp_y * self._warp).ravel()
        self._warp_x = (self.tex.warp_x * self._warp).ravel()
        maps = self.layout.maps
        self._maps_main = np.ascontiguousarray(maps[..., :N_MAIN].reshape(-1, N_MAIN))
        self._maps_art = np.ascontiguousarray(maps[..., N_MAIN:].reshape(-1, maps.shape[-1] - N_MAIN))
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cache_size = 4 * (self.width // self.block + 3)
        self._lock = threading.Lock()
        self.block_counts: dict[tuple[int, int], np.ndarray] = {}

    # ------------------------------------------------------------------ classes
    def classify_cells(
        self, cy: np.ndarray, cx: np.ndarray, artefacts: bool = False
    ) -> tuple[np.ndarray | None, np.ndarray]:
        """(class, continuous maps) at global cell indices (any matching shapes).

        The continuous maps are (density, fold, til) channels, or (blur, pen) with `artefacts`.
        """
        values = self.cell_values(cy, cx, artefacts)
        if artefacts:
            return None, values
        return values[..., :K].argmax(axis=-1).astype(np.uint8), values[..., K:]

    def cell_values(self, cy: np.ndarray, cx: np.ndarray, artefacts: bool = False) -> np.ndarray:
        """Layout channels (K class scores, density, fold, til) at the warped centres of cells.

        Bilinear interpolation on flattened maps with np.take: 2-D fancy indexing is ~3x slower.
        """
        nc = self.tex.warp_y.shape[0]
        oy, ox = self.offset[0] // self.cell, self.offset[1] // self.cell
        widx = ((cy + oy) % nc) * nc + (cx + ox) % nc
        wy = np.take(self._warp_y, widx)
        wx = np.take(self._warp_x, widx)
        mh, mw = self.layout.maps.shape[:2]
        s = np.float32(self._map_scale)
        my = cy.astype(np.float32) * s + np.float32(0.5 * self._map_scale - 0.5) + wy
        mx = cx.astype(np.float32) * s + np.float32(0.5 * self._map_scale - 0.5) + wx
        np.clip(my, 0, mh - 1.001, out=my)
        np.clip(mx, 0, mw - 1.001, out=mx)
        iy = my.astype(np.int32)
        ix = mx.astype(np.int32)
        fy = (my - iy)[..., None]
        fx = (mx - ix)[..., None]
        base = iy * mw + ix
        flat = self._maps_art if artefacts else self._maps_main
        v00 = np.take(flat, base, axis=0)
        v01 = np.take(flat, base + 1, axis=0)
        v10 = np.take(flat, base + mw, axis=0)
        v11 = np.take(flat, base + (mw + 1), axis=0)
        v01 -= v00
        v01 *= fx
        v00 += v01
        v11 -= v10
        v11 *= fx
        v10 += v11
        v10 -= v00
        v10 *= fy
        v00 += v10
        return v00

    def _ring_values(self, cy0: int, cx0: int, hc: int, wc: int) -> np.ndarray:
        """Cell values of the cell block [cy0, cy0 + hc) x [cx0, cx0 + wc) plus a 1-cell ring."""
        cy, cx = np.meshgrid(
            np.arange(cy0 - 1, cy0 + hc + 1), np.arange(cx0 - 1, cx0 + wc + 1), indexing="ij"
        )
        return self.cell_values(cy, cx)

    def _pixel_classes(self, ring: np.ndarray, py: np.ndarray, px: np.ndarray) -> np.ndarray:
        """Class of pixels (local coordinates of the ring's cell block): argmax of cell scores
        interpolated bilinearly between cell centres, so borders are smooth curves, not 2 um steps.
        Inside a uniform neighbourhood this equals the cell's class (argmax survives averaging)."""
        c = self.cell
        # ring coordinates of the pixel centre; ring cell r (global cell cy0 - 1 + r) is centred at r
        u = (py + 0.5) / c + 0.5
        v = (px + 0.5) / c + 0.5
        iu = np.floor(u).astype(np.int64)
        iv = np.floor(v).astype(np.int64)
        tu = (u - iu).astype(np.float32)[:, None]
        tv = (v - iv).astype(np.float32)[:, None]
        s = ring[..., :K]
        score = (s[iu, iv] * (1 - tv) + s[iu, iv + 1] * tv) * (1 - tu) + (
            s[iu + 1, iv] * (1 - tv) + s[iu + 1, iv + 1] * tv
        ) * tu
        return score.argmax(axis=-1).astype(np.uint8)

    def classify_points(self, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(class, continuous maps) at pixels (global, 1-D): the same bilinear interpolation of the
        four surrounding cells' scores as the rendered borders, so nuclei match painted classes."""
        c = self.cell
        gy = (y + 0.5) / c - 0.5
        gx = (x + 0.5) / c - 0.5
        iy = np.floor(gy).astype(np.int64)
        ix = np.floor(gx).astype(np.int64)
        ty = (gy - iy).astype(np.float32)[:, None]
        tx = (gx - ix).astype(np.float32)[:, None]
        values = self.cell_values(
            np.concatenate([iy, iy, iy + 1, iy + 1]), np.concatenate([ix, ix + 1, ix, ix + 1])
        ).reshape(4, len(y), -1)
        mixed = (values[0] * (1 - tx) + values[1] * tx) * (1 - ty) + (values[2] * (1 - tx) + values[3] * tx) * ty
        return mixed[:, :K].argmax(axis=-1).astype(np.uint8), mixed[:, K:]

    def classes(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """Tissue class (uint8, see params.CLASSES) of every pixel of a region, as rendered."""
        c = self.cell
        cy0, cx0 = y0 // c, x0 // c
        cy1, cx1 = -(-(y0 + h) // c), -(-(x0 + w) // c)
        ring = self._ring_values(cy0, cx0, cy1 - cy0, cx1 - cx0)
        py, px = np.meshgrid(np.arange(y0 - cy0 * c, y0 - cy0 * c + h), np.arange(x0 - cx0 * c, x0 - cx0 * c + w),
                             indexing="ij")
        return self._pixel_classes(ring, py.ravel(), px.ravel()).reshape(h, w)

    # ------------------------------------------------------------------ nuclei
    def _make_block(self, by: int, bx: int) -> np.ndarray:
        """Nuclei (y, x, kind, variant) whose centre lies in block (by, bx); deterministic.

        Candidates of every kind are drawn first (a fixed number of draws per kind, so a block's
        nuclei do not depend on its neighbours), then classified in one call and thinned by the
        acceptance probability of the class under each candidate.
        """
        p = self.params
        rng = np.random.default_rng(np.random.SeedSequence([p.seed, 2, by + 1, bx + 1]))
        b = self.block
        y0, x0 = by * b, bx * b
        ys_all, xs_all, spec_idx = [], [], []
        for i, spec in enumerate(NUCLEI):
            if spec.spacing_um is not None:
                n = max(1, int(round(b * self.mpp / spec.spacing_um)))
                step = b / n
                gy, gx = np.mgrid[0:n, 0:n].reshape(2, -1).astype(np.float64)
                ys = y0 + (gy + 0.5 + rng.uniform(-0.42, 0.42, gy.shape)) * step
                xs = x0 + (gx + 0.5 + rng.uniform(-0.42, 0.42, gx.shape)) * step
            else:
                count = rng.poisson(spec.density_per_mm2 * (b * self.mpp / 1000.0) ** 2)
                ys = y0 + rng.uniform(0, b, count)
                xs = x0 + rng.uniform(0, b, count)
            ys_all.append(ys)
            xs_all.append(xs)
            spec_idx.append(np.full(len(ys), i, np.int64))
        yi = np.floor(np.concatenate(ys_all)).astype(np.int64)
        xi = np.floor(np.concatenate(xs_all)).astype(np.int64)
        si = np.concatenate(spec_idx)
        n = len(yi)
        u = rng.random(n)
        variant = rng.integers(0, VARIANTS, n)
        mitotic = rng.random(n) < p.mitotic_fraction
        # drawn after every other draw of the block, so adding look-alikes moved no other nucleus
        apoptotic = rng.random(n) < p.apoptotic_fraction
        cls, extra = self.classify_points(yi, xi)
        prob = _ACCEPT[si, cls] + _TIL_ACCEPT[si, cls] * extra[:, CH_TIL - K]
        prob = np.where(_KIND[si] == KIND_FIBROBLAST, prob * extra[:, CH_STROMA_DENSITY - K], prob)
        kind = _KIND[si].copy()
        tum = kind == KIND_TUMOUR
        if tum.any() and p.appearance.glands > 0:  # no epithelial nuclei inside gland lumens
            lum = self.tex.lumens[(yi[tum] + self.offset[0]) % self.period, (xi[tum] + self.offset[1]) % self.period]
            prob[tum] *= 1.0 - np.minimum(1.0, 1.3 * p.appearance.glands * lum)
        kind[tum & mitotic] = KIND_MITOSIS
        kind[tum & apoptotic & ~mitotic] = KIND_APOPTOTIC
        oriented = (kind == KIND_FIBROBLAST) | (kind == KIND_FAT)
        if oriented.any():
            per = VARIANTS // ANGLES
            nc = self.tex.fibre_angle.shape[0]
            cyi = (yi[oriented] + self.offset[0]) // self.cell % nc
            cxi = (xi[oriented] + self.offset[1]) // self.cell % nc
            angle = self.tex.fibre_angle[cyi, cxi].astype(np.int64)
            variant[oriented] = angle * per + variant[oriented] % per
        keep = u < prob
        nuclei = np.stack([yi, xi, kind, variant], axis=1)[keep].astype(np.int32)
        inside = (nuclei[:, 0] < self.height) & (nuclei[:, 1] < self.width)
        self.block_counts[(by, bx)] = np.bincount(nuclei[inside, 2], minlength=len(KINDS))
        return nuclei

    def _block(self, by: int, bx: int) -> np.ndarray:
        key = (by, bx)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        nuclei = self._make_block(by, bx)
        with self._lock:
            self._cache[key] = nuclei
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return nuclei

    def nuclei(self, y0: int, x0: int, h: int, w: int, margin: int = 0) -> np.ndarray:
        """Nuclei (y, x, kind, variant) with centres in the region grown by `margin` px."""
        b = self.block
        ya, yb, xa, xb = y0 - margin, y0 + h + margin, x0 - margin, x0 + w + margin
        parts = [
            self._block(by, bx)
            for by in range(max(0, ya // b), max(0, (yb - 1) // b) + 1)
            for bx in range(max(0, xa // b), max(0, (xb - 1) // b) + 1)
        ]
        parts.append(self.extra)
        allnuc = np.concatenate(parts)
        sel = (allnuc[:, 0] >= ya) & (allnuc[:, 0] < yb) & (allnuc[:, 1] >= xa) & (allnuc[:, 1] < xb)
        return allnuc[sel]

    def count_nuclei(self) -> dict[str, int]:
        """Nuclei of each kind over the whole slide (generates every block; cheap next to rendering)."""
        b = self.block
        for by in range(-(-self.height // b)):
            for bx in range(-(-self.width // b)):
                if (by, bx) not in self.block_counts:
                    self._make_block(by, bx)
        total = np.zeros(len(KINDS), np.int64)
        for by in range(-(-self.height // b)):
            for bx in range(-(-self.width // b)):
                total += self.block_counts[(by, bx)]
        return {kind: int(n) for kind, n in zip(KINDS, total)}

    # ------------------------------------------------------------------ pixels
    def _chunk(self, y0: int, x0: int, h: int, w: int, out: np.ndarray) -> None:
        """Paint a cell-aligned chunk that does not cross a texture period into `out` (h, w, 3).

        Concentrations are kept in lookup-table units (0..255) so the table index is two casts.
        Per-cell coefficients are widened to (cell rows, 1, w) and broadcast over the c pixel rows
        of each cell row: numpy is fast along the long contiguous axis, slow along a 4-px one.
        """
        c = self.cell
        hc, wc = h // c, w // c
        ring = self._ring_values(y0 // c, x0 // c, hc, wc)
        ring_cls = ring[..., :K].argmax(axis=-1).astype(np.uint8)
        cls = ring_cls[1:-1, 1:-1]
        extra = ring[1:-1, 1:-1, K:]
        ty, tx = y0 + self.offset[0], x0 + self.offset[1]
        glass_noise = wrap_view(self.tex.glass_noise, ty, tx, h, w)[..., None]
        present = np.bincount(cls.ravel(), minlength=K) > 0
        nuc_near = self.nuclei(y0, x0, h, w, margin=self.max_half)
        if not present[1:].any() and len(nuc_near) == 0:
            out[...] = self.glass
            out -= glass_noise
            return

        co = self.coef

        def cellwise(name: str, scale: np.ndarray | None = None) -> np.ndarray:
            v = co[name][cls]
            if scale is not None:
                v = v * scale
            return np.repeat(v, c, axis=1).reshape(hc, 1, w)

        shape = (hc, c, w)
        tmp = np.empty(shape, np.float32)
        gran = wrap_view(self.tex.granular, ty, tx, h, w).reshape(shape)
        e = np.multiply(gran, cellwise("gran"))
        if present[STROMA] or present[FAT]:
            fib = wrap_view(self.tex.fibres, ty, tx, h, w).reshape(shape)
            np.multiply(fib, cellwise("fib", extra[..., CH_STROMA_DENSITY - K]), out=tmp)
            e += tmp
        if present[FAT]:
            wall = wrap_view(self.tex.fat_walls, ty, tx, h, w).reshape(shape)
            np.multiply(wall, cellwise("fat"), out=tmp)
            e += tmp
        e += cellwise("e0")
        hm = np.multiply(gran, cellwise("hgran"))
        hm += cellwise("h0")
        if present[TUMOUR] and self.params.appearance.glands > 0:
            # gland lumens: clear spaces inside the tumour epithelium
            lum = wrap_view(self.tex.lumens, ty, tx, h, w).reshape(shape)
            np.multiply(lum, cellwise("lumen"), out=tmp)
            np.subtract(1.0, tmp, out=tmp)
            e *= tmp
            hm *= tmp
        if self.layout.has_fold:
            fold = extra[..., CH_FOLD - K]
            if fold.max() > 0:  # exact no-op otherwise: chunk-level choices must not change pixels
                gain = np.repeat((1.0 + FOLD_GAIN * fold).astype(np.float32), c, axis=1).reshape(hc, 1, w)
                e *= gain
                hm *= gain
        e = e.reshape(h, w)
        hm = hm.reshape(h, w)
        boundary = np.zeros((hc, wc), bool)
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                if dy != 1 or dx != 1:
                    boundary |= ring_cls[dy : dy + hc, dx : dx + wc] != cls
        if boundary.any():
            self._refine_borders(e, hm, boundary, ring, ty, tx)
        if len(nuc_near):
            gain_map = None
            if self.layout.has_fold:
                gain_map = 1.0 + FOLD_GAIN * np.repeat(np.repeat(extra[..., CH_FOLD - K], c, 0), c, 1)
            self._stamp_list(hm, y0, x0, nuc_near, gain_map, e)
        np.clip(hm, 0, 255, out=hm)
        np.clip(e, 0, 255, out=e)
        idx = hm.astype(np.uint16)
        idx <<= 8
        idx |= e.astype(np.uint16)
        packed = np.take(self._lut32, idx)
        out[...] = packed.view(np.uint8).reshape(h, w, 4)[..., :3]
        out -= glass_noise

    def _refine_borders(
        self, e: np.ndarray, hm: np.ndarray, boundary: np.ndarray, ring: np.ndarray, ty: int, tx: int
    ) -> None:
        """Repaint the pixels of cells on a class border with per-pixel classes (smooth borders).

        Same stain formula as the per-cell path in `_chunk`, evaluated per pixel with gathers;
        border cells are a small fraction of a region, so this costs little.
        """
        c = self.cell
        h, w = e.shape
        bi, bj = np.nonzero(boundary)
        dy, dx = np.divmod(np.arange(c * c), c)
        py = (bi[:, None] * c + dy[None, :]).ravel()
        px = (bj[:, None] * c + dx[None, :]).ravel()
        k = self._pixel_classes(ring, py, px)
        cell_extra = ring[1:-1, 1:-1, K:][bi, bj]  # per border cell
        per_pixel = np.repeat(np.arange(len(bi)), c * c)
        co = self.coef

        def tex(t: np.ndarray) -> np.ndarray:
            return wrap_view(t, ty, tx, h, w)[py, px]

        gran = tex(self.tex.granular)
        density = cell_extra[per_pixel, CH_STROMA_DENSITY - K]
        ev = co["fib"][k] * density * tex(self.tex.fibres) + co["gran"][k] * gran + co["e0"][k]
        fat = co["fat"][k]
        if fat.any():
            ev += fat * tex(self.tex.fat_walls)
        hv = co["hgran"][k] * gran + co["h0"][k]
        lumen = co["lumen"][k]
        if lumen.any():
            factor = 1.0 - lumen * tex(self.tex.lumens)
            ev *= factor
            hv *= factor
        if self.layout.has_fold:
            gain = 1.0 + FOLD_GAIN * cell_extra[per_pixel, CH_FOLD - K]
            ev *= gain
            hv *= gain
        e[py, px] = ev
        hm[py, px] = hv

    def _stamp_list(
        self,
        hmap: np.ndarray,
        y0: int,
        x0: int,
        nuc: np.ndarray,
        gain: np.ndarray | None = None,
        emap: np.ndarray | None = None,
    ) -> None:
        """Stamp nuclei (elementwise max of sprite and H) into the region's H map at (y0, x0).

        Kinds with a halo (apoptotic bodies, mitotic cells) first clear their surroundings (H and E times
        1 - clear), then stamp their eosin (max); only then are all H sprites stamped. Each pass is
        commutative (products, then maxima), so pixels do not depend on the order of the nuclei,
        and neighbouring nuclei stay whole inside a halo.
        """
        h, w = hmap.shape
        sprites = self.sprites
        halves = self.halves
        sizes = self.sizes
        if emap is not None and len(self._halo_kinds):
            special = nuc[np.isin(nuc[:, 2], self._halo_kinds)]
            boxes = []
            for y, x, kind, variant in special.tolist():
                half = halves[kind]
                ya, xa = y - half - y0, x - half - x0
                sy0, sx0 = max(0, -ya), max(0, -xa)
                yb, xb = min(ya + sizes[kind], h), min(xa + sizes[kind], w)
                ya, xa = max(ya, 0), max(xa, 0)
                if ya < yb and xa < xb:
                    boxes.append((ya, xa, yb, xb, sy0, sx0, kind, variant))
            for ya, xa, yb, xb, sy0, sx0, kind, variant in boxes:
                keep = self.clear[kind][variant, sy0 : sy0 + yb - ya, sx0 : sx0 + xb - xa]
                hmap[ya:yb, xa:xb] *= keep
                emap[ya:yb, xa:xb] *= keep
            for ya, xa, yb, xb, sy0, sx0, kind, variant in boxes:
                src = self.eosin[kind][variant, sy0 : sy0 + yb - ya, sx0 : sx0 + xb - xa]
                if gain is not None:
                    src = src * gain[ya:yb, xa:xb]
                dst = emap[ya:yb, xa:xb]
                np.maximum(dst, src, out=dst)
        for y, x, kind, variant in nuc.tolist():
            half = halves[kind]
            ya, xa = y - half - y0, x - half - x0
            yb, xb = ya + sizes[kind], xa + sizes[kind]
            sy0, sx0 = max(0, -ya), max(0, -xa)
            ya, xa = max(ya, 0), max(xa, 0)
            yb, xb = min(yb, h), min(xb, w)
            if ya >= yb or xa >= xb:
                continue
            dst = hmap[ya:yb, xa:xb]
            src = sprites[kind][variant, sy0 : sy0 + yb - ya, sx0 : sx0 + xb - xa]
            if gain is not None:
                src = src * gain[ya:yb, xa:xb]
            np.maximum(dst, src, out=dst)

    def _render_sharp(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """Pixels before blur and pen: cut into cell-aligned chunks within one texture period."""
        c, period = self.cell, self.period
        ya, xa = (y0 // c) * c, (x0 // c) * c
        yb, xb = -(-(y0 + h) // c) * c, -(-(x0 + w) // c) * c
        out = np.empty((yb - ya, xb - xa, 3), np.uint8)

        def cuts(a: int, b: int, off: int) -> list[tuple[int, int]]:
            edges = [a]
            nxt = ((a + off) // period + 1) * period - off
            while nxt < b:
                edges.append(nxt)
                nxt += period
            edges.append(b)
            spans = []
            for s, e in zip(edges[:-1], edges[1:]):
                for t in range(s, e, MAX_CHUNK):
                    spans.append((t, min(e, t + MAX_CHUNK)))
            return spans

        for cy0, cy1 in cuts(ya, yb, self.offset[0]):
            for cx0, cx1 in cuts(xa, xb, self.offset[1]):
                self._chunk(cy0, cx0, cy1 - cy0, cx1 - cx0, out[cy0 - ya : cy1 - ya, cx0 - xa : cx1 - xa])
        return out[y0 - ya : y0 - ya + h, x0 - xa : x0 - xa + w]

    def _pixel_map(self, channel: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """A continuous layout channel (blur weight, pen ink) per pixel, bilinear: smooth edges.

        Separable (rows, then columns), so it costs two small gathers per pixel.
        """
        scale = self.mpp / self.layout.map_um
        plane = self.layout.maps[..., channel]
        mh, mw = plane.shape
        my = np.clip((np.arange(y0, y0 + h, dtype=np.float32) + 0.5) * scale - 0.5, 0, mh - 1.001)
        mx = np.clip((np.arange(x0, x0 + w, dtype=np.float32) + 0.5) * scale - 0.5, 0, mw - 1.001)
        iy, ix = my.astype(np.int64), mx.astype(np.int64)
        fy, fx = (my - iy)[:, None], (mx - ix)[None, :]
        rows = plane[iy] * (1 - fy) + plane[iy + 1] * fy
        return rows[:, ix] * (1 - fx) + rows[:, ix + 1] * fx

    def _box_px(self, box_um, y0: int, x0: int, h: int, w: int) -> tuple[int, int, int, int] | None:
        """Intersection (ya, xa, yb, xb) of the region with an artefact's box, or None."""
        if box_um is None:
            return None
        ya = max(y0, int(np.floor(box_um[0] / self.mpp)))
        xa = max(x0, int(np.floor(box_um[1] / self.mpp)))
        yb = min(y0 + h, int(np.ceil(box_um[2] / self.mpp)) + 1)
        xb = min(x0 + w, int(np.ceil(box_um[3] / self.mpp)) + 1)
        return (ya, xa, yb, xb) if ya < yb and xa < xb else None

    def render(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) of the level-0 region; a pure function of the region."""
        lay = self.layout
        rgb = np.ascontiguousarray(self._render_sharp(y0, x0, h, w))  # a fresh array: safe to edit
        box = self._box_px(lay.blur_box_um, y0, x0, h, w) if lay.has_blur else None
        if box is not None:
            ya, xa, yb, xb = box
            weight = self._pixel_map(CH_BLUR, ya, xa, yb - ya, xb - xa)
            if weight.max() > 0.001:
                # an out-of-focus area: the blurred pixels need their neighbours, so render a margin
                sigma = self.params.artefacts.blur_sigma_um / self.mpp
                m = int(3.0 * sigma + 0.5) + 1  # >= scipy's kernel radius for truncate=3
                big = self._render_sharp(ya - m, xa - m, yb - ya + 2 * m, xb - xa + 2 * m)
                soft = ndimage.gaussian_filter(big, (sigma, sigma, 0), output=np.float32, truncate=3.0)[m:-m, m:-m]
                sharp = rgb[ya - y0 : yb - y0, xa - x0 : xb - x0]
                wgt = weight[..., None]
                sharp[...] = np.clip(sharp * (1 - wgt) + soft * wgt + 0.5, 0, 255)
        box = self._box_px(lay.pen_box_um, y0, x0, h, w) if lay.has_pen else None
        if box is not None:
            ya, xa, yb, xb = box
            ink = self._pixel_map(CH_PEN, ya, xa, yb - ya, xb - xa)
            if ink.max() > 0.001:
                od = np.asarray(PEN_INKS[self.params.artefacts.pen_colour], np.float32)
                sub = rgb[ya - y0 : yb - y0, xa - x0 : xb - x0]
                sub[...] = np.clip(sub * np.exp(-1.6 * ink[..., None] * od) + 0.5, 0, 255)
        return rgb

    __call__ = render
