"""Helpers of the downstream tests (no tests here): small grid stores written through nic.grids'
writer, with a known per-slide latent value planted in the embeddings so models can learn it."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from nic.grids.dihedral import transform_positions
from nic.grids.schema import GridMeta
from nic.grids.writer import grid_table, write_slide_grid


def blob_mask(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """An elliptic tissue blob filling most of a rows x cols grid."""
    rr, cc = np.mgrid[0:rows, 0:cols]
    cy, cx = (rows - 1) / 2 + rng.uniform(-1, 1), (cols - 1) / 2 + rng.uniform(-1, 1)
    ry, rx = rows * rng.uniform(0.3, 0.45), cols * rng.uniform(0.3, 0.45)
    mask = ((rr - cy) / ry) ** 2 + ((cc - cx) / rx) ** 2 <= 1.0
    mask[int(round(cy)), int(round(cx))] = True
    return mask


def write_grid(grids_dir: Path, slide_id: str, embedding_grid: np.ndarray, mask: np.ndarray,
               dihedral: bool = False, variant_offset: float = 0.0, encoder_hash: str = "test-encoder") -> None:
    """Write a (C, H, W) grid (cells where mask is true) as a nic grid file. With dihedral=True all 8
    transforms are written; transform k's embeddings get `variant_offset * k` added to channel 1 so a
    test can tell a stored variant from a rotated identity grid."""
    c, h, w = embedding_grid.shape
    rows, cols = np.nonzero(mask)
    emb = embedding_grid[:, rows, cols].T
    transforms = tuple(range(8)) if dihedral else (0,)
    all_r, all_c, all_e, all_t = [], [], [], []
    for k in transforms:
        r, cc = transform_positions(rows, cols, (h, w), k)
        e = emb.copy()
        if k:
            e[:, 1] += variant_offset * k
        all_r.append(r)
        all_c.append(cc)
        all_e.append(e)
        all_t.append(np.full(len(rows), k))
    n = len(rows)
    meta = GridMeta(slide_id=slide_id, path=f"{slide_id}.tiff", rows=h, cols=w, tile_px=128, mpp=0.5, level=0,
                    tiles=n, embedding_dim=c, encoder_name="test", encoder_hash=encoder_hash, transforms=transforms)
    reps = len(transforms)
    table = grid_table(
        meta, np.concatenate(all_r), np.concatenate(all_c), np.tile(cols * 128, reps), np.tile(rows * 128, reps),
        np.ones(n * reps, dtype=np.float32), np.concatenate(all_e), np.concatenate(all_t),
    )
    write_slide_grid(grids_dir, table, meta)


def make_cohort(root: Path, n: int = 24, channels: int = 8, size: tuple[int, int] = (8, 14), seed: int = 0,
                patients_with_two: int = 4, signal: float = 2.5, dihedral: bool = False) -> tuple[Path, Path]:
    """A grid store and labels.csv of n slides: latent z ~ U(0, 1) per patient drives every target
    (binary 'label' = z > 0.5, 'score' = 10 z + noise, 'grade' 0-2 = tertile of z, survival time
    shorter for higher z). z is planted in embedding channel 0 of every tissue cell."""
    rng = np.random.default_rng(seed)
    grids = root / "grids"
    rows = []
    n_patients = n - patients_with_two
    z_patient = rng.uniform(0, 1, size=n_patients)
    slide_patient = list(range(n_patients)) + list(rng.choice(n_patients, patients_with_two, replace=False))
    for i, p in enumerate(slide_patient):
        z = z_patient[p]
        h, w = rng.integers(size[0], size[1] + 1, size=2)
        mask = blob_mask(int(h), int(w), rng)
        emb = rng.normal(0, 1, size=(channels, h, w)).astype(np.float32)
        emb[0] += signal * (z - 0.5) * 2
        emb[:, ~mask] = 0
        sid = f"s{i:03d}"
        write_grid(grids, sid, emb, mask, dihedral=dihedral)
        t = float(rng.exponential(1.0 / np.exp(3 * (z - 0.5)))) * 10 + 0.1
        rows.append({"slide_id": sid, "patient_id": f"p{p:03d}", "label": int(z > 0.5),
                     "grade": int(min(2, z * 3)), "score": 10 * z + rng.normal(0, 0.3),
                     "time": round(t, 3), "event": int(rng.random() < 0.8)})
    labels = root / "labels.csv"
    pd.DataFrame(rows).to_csv(labels, index=False)
    return grids, labels


def assert_same_weights(a: bytes, b: bytes) -> None:
    """Two model.pt files (nic.downstream.models.save_model) hold the same meta and weights."""
    first, second = (torch.load(io.BytesIO(blob), weights_only=True) for blob in (a, b))
    assert first["meta"] == second["meta"]
    assert first["state_dict"].keys() == second["state_dict"].keys()
    for name, value in first["state_dict"].items():
        assert torch.equal(value, second["state_dict"][name]), name
