"""Lazy access to feature grids for training and evaluation.

A cohort's grids do not fit in memory (a 400 x 400 x 128 float32 grid is 80 MB), so a dataset holds
slide ids and targets only and reads a slide's grid when an item is asked for, through a small
bounded LRU cache. Each item is a fresh random crop under a random rotation/flip; when compression
wrote the 8 pixel-level dihedral variants, the variant is read from the store instead of rotating
the array (see nic.downstream.crops).
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from nic.downstream.crops import center_crop, center_weights, crop, dihedral, sample_centers
from nic.grids.reader import load_grid, read_grid_meta
from nic.storage import ensure_local, local_path

GridLoader = Callable[..., tuple[np.ndarray, np.ndarray]]

# Memory bound of one worker's grid cache whatever `cache_grids` says: 64 synthetic-cohort grids
# (~0.3 MB each) fit many times over, while 64 grids of 400 x 400 x 128 float16 (40 MB each) would not.
CACHE_BYTES = 1 << 30


class GridSource:
    """Reads grids (one transform at a time) with a bounded LRU cache and counts the reads.

    `crops(slide_id, k, n, size, rng)` gives n random crops of the slide under dihedral transform k:
    from the stored pixel-level variant when the grid file has it, else crops of the identity grid
    with their cells moved (cropping first, so only R x R cells are copied, not the whole grid).
    Crop-centre weights (a distance transform) are computed once per cached grid.
    """

    def __init__(self, grids_dir: str | Path, cache_size: int = 4, loader: GridLoader | None = None,
                 max_cache_bytes: int = CACHE_BYTES):
        # On an object store, this worker's node fetches the whole store once (changed files only),
        # so the reads of every epoch need no request to the store.
        self.grids_dir = ensure_local(local_path(grids_dir), missing_ok=True)
        self.cache_size = max(0, int(cache_size))
        self.max_cache_bytes = int(max_cache_bytes)
        self._cache_bytes = 0
        self.loader = loader or functools.partial(load_grid, fetch=False)
        self.loads = 0  # grid reads from storage (for tests and diagnostics)
        self._cache: OrderedDict[tuple[str, int], list] = OrderedDict()
        self._variants: dict[str, tuple[int, ...]] = {}

    def variants(self, slide_id: str) -> tuple[int, ...]:
        """Transforms stored for a slide (read from the file's metadata once, not its rows)."""
        if slide_id not in self._variants:
            self._variants[slide_id] = tuple(read_grid_meta(self.grids_dir, slide_id, fetch=False).transforms)
        return self._variants[slide_id]

    def _entry(self, slide_id: str, k: int) -> list:
        """[grid, mask, centre weights or None] of a stored transform, through the LRU cache."""
        key = (slide_id, k)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        grid, mask = self.loader(self.grids_dir, slide_id, transform=k)
        self.loads += 1
        # Embeddings are stored as float16, so holding them as float16 loses nothing and halves
        # the cache; crops are converted to float32 (only R x R cells).
        if grid.dtype != np.float16:
            grid = torch.from_numpy(np.ascontiguousarray(grid)).half().numpy()  # torch converts ~4x faster
        entry = [grid, mask, None]
        if self.cache_size:
            self._cache[key] = entry
            self._cache_bytes += grid.nbytes + mask.nbytes
            # The newest entry always stays: a grid larger than the budget is still read once per item.
            while len(self._cache) > 1 and (len(self._cache) > self.cache_size
                                            or self._cache_bytes > self.max_cache_bytes):
                _, (old_grid, old_mask, _) = self._cache.popitem(last=False)
                self._cache_bytes -= old_grid.nbytes + old_mask.nbytes
        return entry

    def load(self, slide_id: str, k: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """The stored grid (float16) and mask of transform k (k must be stored; 0 always is)."""
        grid, mask, _ = self._entry(slide_id, k)
        return grid, mask

    def transform(self, slide_id: str, k: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """The whole grid under transform k: the stored variant, else the identity with cells moved."""
        if k in self.variants(slide_id):
            return self.load(slide_id, k)
        grid, mask = self.load(slide_id, 0)
        return dihedral(grid, mask, k)

    def crops(self, slide_id: str, k: int, n: int, size: int, rng: np.random.Generator
              ) -> list[tuple[np.ndarray, np.ndarray]]:
        """n size x size crops under transform k, centres drawn in proportion to distance from background."""
        stored = k in self.variants(slide_id)
        entry = self._entry(slide_id, k if stored else 0)
        grid, mask = entry[0], entry[1]
        if entry[2] is None:
            entry[2] = center_weights(mask)
        out = []
        for r, c in sample_centers(mask, n, rng, weights=entry[2]):
            g, m = crop(grid, mask, (int(r), int(c)), size)
            out.append((g, m) if stored else dihedral(g, m, k))
        return out

    @property
    def cached(self) -> int:
        return len(self._cache)


class GridDataset(Dataset):
    """Random (train) or centred (eval) R x R crops of slides' grids, with their targets.

    Items: {"grid": float32 (C, R, R), "mask": bool (R, R), "index": int, and per target kind
    "target" (float or class index), or "time" and "event"}. Nothing is read at construction.
    """

    def __init__(
        self,
        grids_dir: str | Path,
        slide_ids: Sequence[str],
        targets: dict[str, np.ndarray],
        crop_size: int,
        train: bool = True,
        augment: bool = True,
        cache_size: int = 4,
        loader: GridLoader | None = None,
    ):
        self.slide_ids = list(slide_ids)
        for name, values in targets.items():
            if len(values) != len(self.slide_ids):
                raise ValueError(f"target {name!r} has {len(values)} values for {len(self.slide_ids)} slides")
        self.targets = {name: np.asarray(values) for name, values in targets.items()}
        self.crop_size = int(crop_size)
        self.train = train
        self.augment = augment
        self.source = GridSource(grids_dir, cache_size=cache_size, loader=loader)

    def __len__(self) -> int:
        return len(self.slide_ids)

    def __getitem__(self, index: int) -> dict:
        slide_id = self.slide_ids[index]
        if self.train:
            # Seeded from torch so DataLoader worker seeding and torch.manual_seed make runs repeatable.
            rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, ())))
            k = int(rng.integers(8)) if self.augment else 0
            grid, mask = self.source.crops(slide_id, k, 1, self.crop_size, rng)[0]
        else:
            grid, mask = self.source.load(slide_id, 0)
            grid, mask = center_crop(grid, mask, self.crop_size)
        item = {"grid": torch.from_numpy(np.ascontiguousarray(grid)).float(),
                "mask": torch.from_numpy(np.ascontiguousarray(mask)), "index": index}
        for name, values in self.targets.items():
            item[name] = torch.as_tensor(values[index])
        return item


def balanced_weights(classes: np.ndarray) -> np.ndarray:
    """Sampling probability per sample so that every class is drawn equally often."""
    classes = np.asarray(classes).astype(int)
    counts = np.bincount(classes)
    w = 1.0 / counts[classes]
    return w / w.sum()


class EpochSampler(Sampler[int]):
    """Per-epoch order of samples for one DDP rank: `repeats` rounds, each a shuffled permutation
    of the n samples (so every sample comes `repeats` times, and a batch rarely holds the same
    slide twice), or (balanced) n x repeats draws with replacement in proportion to `weights`;
    padded to a multiple of the world size and split by rank so every rank runs the same number of
    steps. With GridDataset(train=True) every repeat is a fresh random crop, which is how
    `crops_per_slide` gives a small cohort enough optimiser steps. Call set_epoch() before each
    epoch."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 weights: np.ndarray | None = None, shuffle: bool = True, repeats: int = 1):
        if n < 1:
            raise ValueError("EpochSampler needs at least one sample")
        if repeats < 1:
            raise ValueError(f"EpochSampler repeats must be >= 1, got {repeats}")
        self.n = n
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.weights = weights
        self.shuffle = shuffle
        self.repeats = int(repeats)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _epoch_order(self) -> np.ndarray:
        """The whole epoch's order (all ranks), n x repeats samples."""
        rng = np.random.default_rng((self.seed, self.epoch))
        if self.weights is not None:
            return rng.choice(self.n, size=self.n * self.repeats, replace=True, p=self.weights)
        if self.shuffle:
            return np.concatenate([rng.permutation(self.n) for _ in range(self.repeats)])
        return np.tile(np.arange(self.n), self.repeats)

    def _order(self) -> np.ndarray:
        order = self._epoch_order()
        order = np.resize(order, len(self) * self.world_size)  # pad by repeating the start
        return order[self.rank::self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(int(i) for i in self._order())

    def __len__(self) -> int:
        return -(-(self.n * self.repeats) // self.world_size)
