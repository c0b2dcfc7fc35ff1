"""The driver side of compression: gather each slide's embeddings as batches arrive, write the
slide exactly once when its last tile is in, and keep the manifest current.

Rows can arrive twice (Ray Data retries the task of a killed encoder actor) and in any order, so
every slide gets a preallocated buffer indexed by (transform, tile index) with a filled mask: a
duplicate overwrites an identical value, a slide is complete when every cell is filled, and rows of
a slide that is already written or failed are ignored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nic.artifacts import STATUS_OK
from nic.grids.manifest import failed_row, grid_row
from nic.grids.schema import GridError, GridMeta
from nic.grids.writer import grid_table, remove_slide_grid, write_slide_grid
from nic.slides.stage import CRASH, ManifestRow
from nic.storage import display


@dataclass
class EncoderFacts:
    """What the driver knows about the encoder, for metadata and manifest rows."""

    name: str
    content_hash: str
    embedding_dim: int
    head_columns: tuple[str, ...] = ()  # `--heads`: the head-map columns the actors add
    ref: Any = None  # what the actors load: the encoder name/folder, or your own encoder's resolved EncoderSpec
    record: dict | None = None  # your own encoder: what every grid records as `extra["encoder"]`


@dataclass
class _SlideBuffer:
    meta: GridMeta
    plan_seconds: float
    first_seen: float
    row: np.ndarray
    col: np.ndarray
    x: np.ndarray
    y: np.ndarray
    tissue: np.ndarray
    embedding: np.ndarray
    transform: np.ndarray
    filled: np.ndarray
    heads: np.ndarray
    n_filled: int = 0


@dataclass
class SlideCollector:
    """Turns the encoder pool's output batches into grid files and manifest rows."""

    grids_dir: Path
    encoder: EncoderFacts
    transforms: tuple[int, ...]
    options_hash: str
    paths: dict[str, str]
    results: dict[str, ManifestRow] = field(default_factory=dict)
    tiles_done: int = 0
    duplicates: int = 0
    actor_read_s: float = 0.0
    actor_encode_s: float = 0.0
    precision_codes: set[int] = field(default_factory=set)
    _buffers: dict[str, _SlideBuffer] = field(default_factory=dict)

    @property
    def finished(self) -> int:
        return len(self.results)

    def add_batch(self, batch: dict[str, np.ndarray]) -> list[str]:
        """Take one output batch of the encoder pool; returns the ids of slides finished by it."""
        finished: list[str] = []
        if "read_s" in batch:
            self.actor_read_s += float(np.sum(batch["read_s"]))
            self.actor_encode_s += float(np.sum(batch["encode_s"]))
        if "precision" in batch:
            self.precision_codes.update(int(v) for v in np.unique(batch["precision"]))
        slide_ids = np.asarray(batch["slide_id"])
        if len(slide_ids) == 0:
            return finished
        # Batches hold one or a few slides; handle each slide's rows together.
        order = np.argsort(slide_ids, kind="stable")
        sorted_ids = slide_ids[order]
        bounds = np.flatnonzero(sorted_ids[1:] != sorted_ids[:-1]) + 1
        for part in np.split(order, bounds):
            sid = str(slide_ids[part[0]])
            if sid in self.results:
                self.duplicates += len(part)
                continue
            error = str(batch["error"][part[0]])
            if error:
                self._fail(sid, error, str(batch["error_kind"][part[0]]), float(batch["plan_seconds"][part[0]]))
                finished.append(sid)
                continue
            if self._add_rows(sid, batch, part):
                finished.append(sid)
        return finished

    def _buffer(self, sid: str, batch: dict[str, np.ndarray], i: int) -> _SlideBuffer:
        buf = self._buffers.get(sid)
        if buf is not None:
            return buf
        n = int(batch["n_tiles"][i])
        size = n * len(self.transforms)
        base_mpp = float(batch["base_mpp"][i])
        meta = GridMeta(
            slide_id=sid, path=display(self.paths.get(sid, "")), rows=int(batch["grid_rows"][i]),
            cols=int(batch["grid_cols"][i]), tile_px=int(batch["tile_px"][i]), mpp=float(batch["mpp"][i]),
            level=int(batch["level"][i]), tiles=n, embedding_dim=self.encoder.embedding_dim,
            encoder_name=self.encoder.name, encoder_hash=self.encoder.content_hash, transforms=self.transforms,
            base_mpp=base_mpp if base_mpp == base_mpp else None, options_hash=self.options_hash,
            head_columns=self.encoder.head_columns,
            extra={"encoder": self.encoder.record} if self.encoder.record else {},
        )
        buf = _SlideBuffer(
            meta=meta, plan_seconds=float(batch["plan_seconds"][i]), first_seen=time.perf_counter(),
            row=np.zeros(size, np.int32), col=np.zeros(size, np.int32), x=np.zeros(size, np.int64),
            y=np.zeros(size, np.int64), tissue=np.zeros(size, np.float32),
            embedding=np.zeros((size, self.encoder.embedding_dim), np.float16),
            transform=np.zeros(size, np.int8), filled=np.zeros(size, bool),
            heads=np.zeros((size, len(self.encoder.head_columns)), np.float32),
        )
        self._buffers[sid] = buf
        return buf

    def _add_rows(self, sid: str, batch: dict[str, np.ndarray], idx: np.ndarray) -> bool:
        buf = self._buffer(sid, batch, int(idx[0]))
        n = buf.meta.tiles
        t_pos = {t: i for i, t in enumerate(self.transforms)}
        tile_index = np.asarray(batch["tile_index"])[idx].astype(np.int64)
        transform = np.asarray(batch["transform"])[idx]
        slot = np.fromiter((t_pos[int(t)] for t in transform), np.int64, len(idx)) * n + tile_index
        if tile_index.min() < 0 or tile_index.max() >= n:
            raise RuntimeError(f"slide {sid}: tile index outside 0..{n - 1} (pipeline bug)")
        new = ~buf.filled[slot]
        self.duplicates += int((~new).sum())
        buf.row[slot] = batch["row"][idx]
        buf.col[slot] = batch["col"][idx]
        buf.x[slot] = batch["x"][idx]
        buf.y[slot] = batch["y"][idx]
        buf.tissue[slot] = batch["tissue"][idx]
        buf.embedding[slot] = batch["embedding"][idx]
        buf.transform[slot] = transform
        if buf.heads.shape[1]:
            buf.heads[slot] = batch["heads"][idx]
        buf.filled[slot] = True
        added = int(np.unique(slot[new]).size)
        buf.n_filled += added
        self.tiles_done += added
        if buf.n_filled < len(buf.filled):
            return False
        self._write(sid, buf)
        return True

    def _write(self, sid: str, buf: _SlideBuffer) -> None:
        try:
            table = grid_table(buf.meta, buf.row, buf.col, buf.x, buf.y, buf.tissue, buf.embedding, buf.transform,
                               buf.heads if buf.heads.shape[1] else None)
            path = write_slide_grid(self.grids_dir, table, buf.meta)
        except (GridError, OSError) as exc:  # e.g. a full disk: this slide fails, the job goes on
            self._fail(sid, f"{buf.meta.path}: could not write its grid: {exc}", "write", 0.0)
            return
        seconds = buf.plan_seconds + (time.perf_counter() - buf.first_seen)
        self.results[sid] = grid_row(buf.meta, STATUS_OK, seconds, str(path.relative_to(self.grids_dir)),
                                     file_bytes=path.stat().st_size)
        del self._buffers[sid]

    def _fail(self, sid: str, reason: str, kind: str, seconds: float) -> None:
        self._buffers.pop(sid, None)
        remove_slide_grid(self.grids_dir, sid)  # an older grid of this slide is no longer valid
        self.results[sid] = failed_row(sid, self.paths.get(sid, ""), reason, kind or "error", seconds,
                                       self.encoder.name, self.encoder.content_hash)

    def fail_unfinished(self, slide_ids: list[str], reason: str, kind: str = CRASH) -> None:
        """After the pipeline ends: every slide without a result lost tiles (their task failed for good)."""
        for sid in slide_ids:
            if sid in self.results:
                continue
            buf = self._buffers.get(sid)
            got = f" ({buf.n_filled} of {len(buf.filled)} tiles arrived)" if buf else ""
            self._fail(sid, f"{self.paths.get(sid, sid)}: {reason}{got}", kind, 0.0)
