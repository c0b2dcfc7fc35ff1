"""A grid store as `nic compress` leaves it, written directly (no slides read, no Ray): the same
writer, the same manifest rows, cheap enough for a thousand slides. Used by the object-store resume
tests and benchmarks/bench_resume_s3.py."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from nic.artifacts import STATUS_OK, write_bytes_atomic, write_manifest
from nic.grids.manifest import MANIFEST_SCHEMA, grid_row
from nic.grids.schema import GridMeta, manifest_path
from nic.grids.writer import grid_table, write_slide_grid
from nic.storage import display


def compress_setup(slides: list[str], encoder: str, out: str):
    """(config, EncoderFacts, options_hash, transforms) of `nic compress --slides ... --encoder ...
    --out ...` with default options: what a re-run of that command will compare the store with."""
    from nic.compress.stage import encoder_facts, options_hash_of
    from nic.config.compress import CompressConfig
    from nic.storage import to_local

    config = CompressConfig(slides=[to_local(s) for s in slides], encoder=encoder, out=to_local(out))
    return config, encoder_facts(config), options_hash_of(config), (0,)


def write_grid_store(out: str | Path, slide_paths: dict[str, str], facts, options_hash: str,
                     transforms: tuple[int, ...] = (0,), tiles: int = 12, seed: int = 0,
                     config=None, manifest: bool = True) -> dict[str, dict]:
    """Write one grid per slide id (`tiles` tissue tiles of random embeddings) and the manifest that
    calls them all ok (unless not `manifest`); `config` (a CompressConfig) also writes
    compress_config.yaml as the stage does. Returns the manifest rows by slide id."""
    from nic.config.base import dump_config

    out = Path(out)
    rng = np.random.default_rng(seed)
    side = max(1, math.ceil(math.sqrt(tiles)))
    cells = np.arange(tiles)
    row, col = (cells // side).astype(np.int32), (cells % side).astype(np.int32)
    rows = {}
    for sid, path in slide_paths.items():
        meta = GridMeta(slide_id=sid, path=display(path), rows=side, cols=side, tile_px=128, mpp=0.5, level=0, tiles=tiles,
                        embedding_dim=facts.embedding_dim, encoder_name=facts.name,
                        encoder_hash=facts.content_hash, transforms=tuple(transforms), base_mpp=0.25,
                        options_hash=options_hash)
        n = tiles * len(transforms)
        table = grid_table(meta, np.tile(row, len(transforms)), np.tile(col, len(transforms)),
                           np.tile(col * 256, len(transforms)), np.tile(row * 256, len(transforms)),
                           np.ones(n, np.float32), rng.normal(size=(n, facts.embedding_dim)).astype(np.float32),
                           np.repeat(np.asarray(transforms, np.int8), tiles))
        target = write_slide_grid(out, table, meta)
        rows[sid] = grid_row(meta, STATUS_OK, 0.1, target.relative_to(out).as_posix(), file_bytes=target.stat().st_size)
    if manifest:
        write_manifest(manifest_path(out), list(rows.values()), MANIFEST_SCHEMA)
    if config is not None:
        write_bytes_atomic(out / "compress_config.yaml", dump_config(config).encode())
    return rows
