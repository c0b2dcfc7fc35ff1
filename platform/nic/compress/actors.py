"""The two kinds of Ray Data workers of `nic compress`.

- `plan_slides`: a task per slide: tissue detection and tile geometry, emitting one light row per
  tissue tile (no pixels). A slide that cannot be used becomes ONE row carrying its error, which
  flows through the pipeline to the driver's manifest without ever being read.
- `EncoderActor`: the actor pool. Each actor loads the encoder once, keeps open readers of the
  last slides it read (one small LRU per thread), reads the pixels of its batch (rows sorted by
  slide, row, col so reads are local), encodes them (under the 8 rotations/flips when asked) and
  returns float16 embeddings. With `read_parallelism` > 1 several batches run at once per actor
  (threads): pixel decoding releases the GIL, so it overlaps the encoding of another batch, while a
  lock keeps one forward pass at a time. With head columns (`nic compress --heads`) it also
  returns the MTL encoder's head outputs per tile (nic.encoders.head_maps) as a float32 `heads`
  column; without, its rows are exactly what they were before head maps.
"""

from __future__ import annotations

import math
import threading
import time
import traceback
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from nic.config.slides import SlideOptions
from nic.grids.dihedral import transform_image, transform_positions

if TYPE_CHECKING:
    from nic.encoders.inference import _InferenceBase

#: Columns of the light tile rows (plan output) and, plus embedding/transform, of the encoded rows.
ROW_COLUMNS = (
    "slide_id", "tile_index", "n_tiles", "row", "col", "x", "y", "tissue", "grid_rows", "grid_cols",
    "tile_px", "mpp", "base_mpp", "level", "plan_seconds", "error", "error_kind",
)
_READERS_PER_THREAD = 2
#: Codes of the `precision` column the actors add (what their encoder computed in).
PRECISION_CODES = {"float32": 0, "bfloat16": 1, "float16": 2}


def _describe(exc: BaseException) -> str:
    return traceback.format_exception_only(type(exc), exc)[-1].strip()


def _error_rows(slide_id: str, reason: str, kind: str, seconds: float) -> dict[str, np.ndarray]:
    """The single row that stands for a slide that cannot be compressed."""
    return {
        "slide_id": np.array([slide_id], dtype=object), "tile_index": np.array([-1], np.int64),
        "n_tiles": np.array([0], np.int64), "row": np.array([-1], np.int32), "col": np.array([-1], np.int32),
        "x": np.array([0], np.int64), "y": np.array([0], np.int64), "tissue": np.array([0.0], np.float32),
        "grid_rows": np.array([0], np.int32), "grid_cols": np.array([0], np.int32),
        "tile_px": np.array([0], np.int32), "mpp": np.array([np.nan]), "base_mpp": np.array([np.nan]),
        "level": np.array([-1], np.int32), "plan_seconds": np.array([seconds]),
        "error": np.array([reason], dtype=object), "error_kind": np.array([kind], dtype=object),
    }


def plan_one(slide_id: str, path: str, options: SlideOptions) -> dict[str, np.ndarray]:
    """Light rows of one slide's tissue tiles (row-major), or its single error row. Never raises."""
    from nic.slides import SlideError, plan_slide
    from nic.slides.stage import no_tissue_error

    start = time.perf_counter()
    try:
        plan = plan_slide(path, options, slide_id=slide_id)
        rows, cols, xs, ys, tissue = plan.tiles()
        if not len(rows):
            raise no_tissue_error(path, plan, options)
    except SlideError as exc:
        return _error_rows(slide_id, str(exc), exc.kind, time.perf_counter() - start)
    except Exception as exc:  # a bug or an unforeseen file problem: report it, keep the job going
        return _error_rows(slide_id, f"{path}: unexpected error while planning: {_describe(exc)}", "error",
                           time.perf_counter() - start)
    n = len(rows)
    res = plan.resolution

    def full(value, dtype) -> np.ndarray:
        return np.full(n, value, dtype=dtype)

    return {
        "slide_id": full(slide_id, object), "tile_index": np.arange(n, dtype=np.int64), "n_tiles": full(n, np.int64),
        "row": rows, "col": cols, "x": xs, "y": ys, "tissue": tissue,
        "grid_rows": full(plan.grid.rows, np.int32), "grid_cols": full(plan.grid.cols, np.int32),
        "tile_px": full(plan.grid.tile_px, np.int32), "mpp": full(res.target_mpp, np.float64),
        "base_mpp": full(res.base_mpp, np.float64), "level": full(res.level, np.int32),
        "plan_seconds": full(time.perf_counter() - start, np.float64),
        "error": full("", object), "error_kind": full("", object),
    }


def plan_slides(batch: dict[str, np.ndarray], options: SlideOptions) -> dict[str, np.ndarray]:
    """Ray Data map_batches function over slide rows (slide_id, path): tile rows of every slide."""
    parts = [plan_one(str(sid), str(path), options) for sid, path in zip(batch["slide_id"], batch["path"], strict=True)]
    if len(parts) == 1:
        return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in ROW_COLUMNS}


def reading_plan(path: str, options: SlideOptions):
    """(ResolutionPlan, TileGrid) of a slide, decided exactly as nic.slides.plan_slide decides them
    but without tissue detection, so an actor can read a slide planned by another worker."""
    from nic.slides import TileGrid, open_slide, resolve_resolution

    slide = open_slide(path)
    try:
        width, height = (int(v) for v in slide.dimensions)
        resolution = resolve_resolution(slide, options, path)
    finally:
        slide.close()
    return resolution, TileGrid(width, height, resolution.base_mpp, options.target_mpp, options.tile_px)


def torch_threads(cpus: float) -> int:
    """Threads for an actor holding `cpus` logical CPUs (a fractional share rounds up)."""
    return max(1, math.ceil(cpus - 1e-9))


class EncoderActor:
    """Callable class for `Dataset.map_batches`: light tile rows in, embedded tile rows out."""

    def __init__(
        self,
        encoder: Any,
        options: SlideOptions,
        paths: dict[str, str],
        transforms: tuple[int, ...] = (0,),
        use_gpu: bool = False,
        mixed_precision: bool = True,
        threads: int = 1,
        head_columns: tuple[str, ...] = (),
        encoder_hash: str | None = None,
    ):
        import torch

        from nic.encoders import load_encoder
        from nic.encoders.inference import reduced_precision

        torch.set_num_threads(max(1, int(threads)))
        self.device = torch.device("cuda" if use_gpu else "cpu")
        model, info = load_encoder(encoder, device=str(self.device))
        if encoder_hash and info.content_hash != encoder_hash:  # weights replaced since the driver loaded them
            raise RuntimeError(f"encoder {info.name}: content hash {info.content_hash[:12]} on this worker differs "
                               f"from the driver's {encoder_hash[:12]} (was it replaced during the job?)")
        # Decided here, not by the driver: actors on other nodes may have other CPUs or GPUs.
        # load_encoder optimises by default: an inference encoder (set_precision, precision)
        self.model = cast("_InferenceBase", model.to(self.device).eval()).set_precision(reduced_precision(self.device.type, mixed_precision))
        self.precision_code = PRECISION_CODES[self.model.precision]
        self.info = info
        self.embedding_dim = int(info.embedding_dim)
        self.options = options
        self.paths = dict(paths)
        self.transforms = tuple(int(t) for t in transforms)
        self.head_columns = tuple(head_columns)
        self.head_mapper = None
        if self.head_columns:
            from nic.encoders.head_maps import load_head_mapper

            self.head_mapper = load_head_mapper(encoder, self.device)
            if self.head_mapper.columns != self.head_columns:  # the encoder folder changed under the job
                raise RuntimeError(f"encoder {info.name}: head columns {list(self.head_mapper.columns)} differ "
                                   f"from the driver's {list(self.head_columns)}")
        self._encode_lock = threading.Lock()
        self._local = threading.local()
        self._caches: list[OrderedDict] = []  # every thread's readers, so close() reaches them all

    # -- reading -------------------------------------------------------------------------------
    def _reader(self, slide_id: str, grid_rows: int, grid_cols: int):
        """This thread's open reader of `slide_id` (TileReader is not thread-safe)."""
        from nic.slides import SlideError, TileReader

        cache: OrderedDict | None = getattr(self._local, "readers", None)
        if cache is None:
            cache = self._local.readers = OrderedDict()
            self._caches.append(cache)
        if slide_id in cache:
            cache.move_to_end(slide_id)
            return cache[slide_id]
        path = self.paths[slide_id]
        resolution, grid = reading_plan(path, self.options)
        if (grid.rows, grid.cols) != (grid_rows, grid_cols):
            raise SlideError(path, f"its tile grid changed since planning ({grid_rows} x {grid_cols} -> "
                             f"{grid.rows} x {grid.cols}); was the file replaced during the job?", "unreadable")
        reader = TileReader(path, resolution, grid)
        cache[slide_id] = reader
        while len(cache) > _READERS_PER_THREAD:
            _, old = cache.popitem(last=False)
            old.close()
        return reader

    def _drop_reader(self, slide_id: str) -> None:
        cache = getattr(self._local, "readers", None)
        if cache and slide_id in cache:
            cache.pop(slide_id).close()

    # -- encoding ------------------------------------------------------------------------------
    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (N, P, P, 3) -> float16 (N, C); one forward pass at a time per actor."""
        return self._forward(pixels, with_heads=False)[0]

    def encode_with_heads(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, P, P, 3) -> (float16 (N, C) embeddings, float32 (N, K) head outputs); the heads
        read the same float32 embeddings that are rounded to float16 for the grid."""
        emb, heads = self._forward(pixels, with_heads=True)
        assert heads is not None
        return emb, heads

    def _forward(self, pixels: np.ndarray, with_heads: bool) -> tuple[np.ndarray, np.ndarray | None]:
        import torch

        # NHWC memory seen as NCHW: channels-last strides, the layout the fused encoders run in,
        # so no copy is made here.
        tensor = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2)
        heads = None
        with self._encode_lock, torch.inference_mode():
            t0 = time.perf_counter()
            tensor = tensor.to(self.device, non_blocking=True)
            emb = self.model(tensor)
            out = emb.float().cpu().numpy()
            if with_heads and self.head_mapper is not None:
                heads = self.head_mapper(tensor, emb).cpu().numpy()
            self._timing["encode_s"] += time.perf_counter() - t0
        if out.shape != (len(pixels), self.embedding_dim):
            raise RuntimeError(f"encoder {self.info.name} returned {out.shape}, expected "
                               f"({len(pixels)}, {self.embedding_dim})")
        return out.astype(np.float16), heads

    def _blank(self, n: int) -> dict[str, np.ndarray]:
        """The encoder's columns of `n` rows that carry no encoding (error rows, empty batches)."""
        out: dict[str, np.ndarray] = {"transform": np.zeros(n, np.int8), "embedding": np.zeros((n, self.embedding_dim), np.float16)}
        if self.head_columns:
            out["heads"] = np.zeros((n, len(self.head_columns)), np.float32)
        return out

    def _read_part(self, part: dict[str, np.ndarray]) -> tuple[np.ndarray | None, dict | None]:
        """(pixels, None) of one slide's rows, or (None, error rows) when planning or reading failed."""
        from nic.slides import SlideError

        n = len(part["slide_id"])
        sid = str(part["slide_id"][0])
        if str(part["error"][0]):  # planning failed: pass the error on, nothing to read
            return None, {**part, **self._blank(n)}
        shape = (int(part["grid_rows"][0]), int(part["grid_cols"][0]))
        t0 = time.perf_counter()
        try:
            pixels = self._reader(sid, *shape).read(part["row"], part["col"])
        except SlideError as exc:
            self._drop_reader(sid)
            return None, self._failed(part, str(exc), exc.kind)
        except Exception as exc:  # unforeseen decoder failure: this slide fails, the job goes on
            self._drop_reader(sid)
            return None, self._failed(part, f"{self.paths.get(sid, sid)}: unexpected error while reading tiles: "
                                            f"{_describe(exc)}", "unreadable")
        self._timing["read_s"] += time.perf_counter() - t0
        return pixels, None

    def _encode_parts(self, parts: list[dict[str, np.ndarray]], pixels: list[np.ndarray]) -> list[dict]:
        """Embedded rows of several slides' tiles, all transforms: one forward pass per transform
        over every slide in the batch (a batch that spans two slides is not split into two smaller,
        slower passes)."""
        outs = []
        sizes = np.cumsum([len(p) for p in pixels])[:-1]
        for k in self.transforms:
            stacked = np.concatenate([px if k == 0 else transform_image(px, k, axes=(1, 2)) for px in pixels])
            heads: list[np.ndarray | None] = [None] * len(parts)
            if self.head_mapper is None:
                embeddings = np.split(self.encode(stacked), sizes)
            else:
                emb_all, heads_all = self.encode_with_heads(stacked)
                embeddings, heads = np.split(emb_all, sizes), [*np.split(heads_all, sizes)]
            for part, emb, head in zip(parts, embeddings, heads, strict=True):
                rows, cols = part["row"], part["col"]
                shape = (int(part["grid_rows"][0]), int(part["grid_cols"][0]))
                # row/col move to the cell the tile occupies in transform k's grid; grid_rows/cols
                # stay the identity grid's shape (GridMeta.shape(k) derives the rest).
                r, c = (rows, cols) if k == 0 else transform_positions(rows, cols, shape, k)
                outs.append({**part, "row": np.asarray(r, np.int32), "col": np.asarray(c, np.int32),
                             "transform": np.full(len(rows), k, np.int8), "embedding": emb,
                             **({} if head is None else {"heads": head})})
        return outs

    def _failed(self, part: dict[str, np.ndarray], reason: str, kind: str) -> dict[str, np.ndarray]:
        n = len(part["slide_id"])
        return {**part, "error": np.full(n, reason, object), "error_kind": np.full(n, kind, object),
                **self._blank(n)}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self._encode_batch(batch)
        # This thread's read and encode seconds since its last batch, on the first row only, so
        # the driver can say where the actors' time went (compress_run.json).
        timing = self._timing
        n = len(out["slide_id"])
        for key in ("read_s", "encode_s"):
            column = np.zeros(n, np.float32)
            if n:
                column[0] = timing[key]
            out[key] = column
            timing[key] = 0.0
        out["precision"] = np.full(n, self.precision_code, np.int8)  # actors on other nodes may differ
        return out

    @property
    def _timing(self) -> dict[str, float]:
        timing = getattr(self._local, "timing", None)
        if timing is None:
            timing = self._local.timing = {"read_s": 0.0, "encode_s": 0.0}
        return timing

    def _encode_batch(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = np.asarray(batch["slide_id"])
        if len(ids) == 0:
            return {**batch, **self._blank(0)}
        order = np.lexsort((np.asarray(batch["col"]), np.asarray(batch["row"]), ids))
        sorted_ids = ids[order]
        bounds = np.flatnonzero(sorted_ids[1:] != sorted_ids[:-1]) + 1
        done: list[dict] = []
        readable: list[dict[str, np.ndarray]] = []
        pixels: list[np.ndarray] = []
        for idx in np.split(order, bounds):
            part = {k: np.asarray(v)[idx] for k, v in batch.items()}
            px, failed = self._read_part(part)
            if failed is not None:
                done.append(failed)
            else:
                assert px is not None  # _read_part gives pixels or a failed row
                readable.append(part)
                pixels.append(px)
        if readable:
            done.extend(self._encode_parts(readable, pixels))
        if len(done) == 1:
            return done[0]
        return {k: np.concatenate([p[k] for p in done]) for k in done[0]}

    def close(self) -> None:
        """Close the open slide readers of every thread that read for this actor. Only when no
        batch is running (a reader is not thread-safe): the local run calls it when its threads
        are done; Ray's actors when they are torn down."""
        caches: Any = getattr(self, "_caches", None) or ()
        for cache in caches:
            while cache:
                _, reader = cache.popitem(last=False)
                reader.close()

    def __del__(self) -> None:
        self.close()
