"""The driver's side of one encoding pass of `nic compress`, whichever way the tiles are encoded:
the Ray Data pipeline (nic.compress.stage) or one encoder in this process (nic.compress.local).

Both feed the encoder's output batches to the same `SlideCollector` (each slide's grid written
once its last tile is in), keep the manifest current with the same `ManifestSaver`, log the same
progress lines and return the same stats (`compress_run.json`), so the two paths cannot drift
apart in what they write or say; each path adds only how it ran (`pool`, `cluster`).
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path

import numpy as np

from nic.compress.actors import PRECISION_CODES
from nic.compress.collector import EncoderFacts, SlideCollector
from nic.grids.manifest import MANIFEST_SCHEMA
from nic.runtime import Progress
from nic.slides.stage import ManifestRow, ManifestSaver

#: Seconds between saves of the manifest while slides finish.
MANIFEST_EVERY_S = 5.0
#: The start of the reason of every slide left unfinished when the encoder itself failed.
PIPELINE_FAILED = "the encoder pipeline failed before this slide was done"


def pipeline_failed(exc: BaseException) -> str:
    """The reason given to every unfinished slide when the encoder (the pool, or the local one)
    failed as a whole: the exception's last line, so the manifest says what went wrong."""
    detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
    return f"{PIPELINE_FAILED}: {detail[:2000]}"


class EncodingPass:
    """One pass over `todo`: takes output batches as they arrive, fills `results` as slides finish,
    and at the end fails what never finished and returns the pass's stats."""

    def __init__(self, out: Path, facts: EncoderFacts, transforms: tuple[int, ...], options_hash: str,
                 todo: list[tuple[str, str]], results: dict[str, ManifestRow], order: list[str],
                 manifest: Path) -> None:
        self.todo, self.results, self.transforms = todo, results, transforms
        self.collector = SlideCollector(out, facts, transforms, options_hash, dict(todo))
        self.progress = Progress("compress", total=len(todo), unit="slides")
        self.unit = "tiles" if len(transforms) == 1 else f"tile encodings (x{len(transforms)} transforms)"
        self.start = time.monotonic()
        self.saver = ManifestSaver(manifest, MANIFEST_SCHEMA, order, results, MANIFEST_EVERY_S)
        self.first_batch: tuple[float, int] | None = None  # (when, tiles done before it)

    def add(self, batch: dict[str, np.ndarray]) -> None:
        """One output batch of the encoder: slides it completes are written and recorded."""
        collector = self.collector
        if self.first_batch is None:
            self.first_batch = (time.monotonic(), collector.tiles_done)
        finished = collector.add_batch(batch)
        for sid in finished:
            self.results[sid] = collector.results[sid]
        rate = collector.tiles_done / max(time.monotonic() - self.start, 1e-9)
        self.progress.update(collector.finished, extra=f"{collector.tiles_done} {self.unit} ({rate:.0f}/s)")
        if finished:
            self.saver.save_if_due()

    def end(self, lost_reason: str) -> dict:
        """Every slide without a result fails with `lost_reason`; returns the stats every path
        records (compress_run.json adds the path's `pool` and `cluster`)."""
        collector = self.collector
        collector.fail_unfinished([sid for sid, _ in self.todo], lost_reason)
        self.results.update({sid: collector.results[sid] for sid, _ in self.todo})
        end = time.monotonic()
        rate = collector.tiles_done / max(end - self.start, 1e-9)
        steady = None  # only meaningful when encoding lasted a while after the first batch
        first = self.first_batch
        if first is not None and end - first[0] > 2.0:
            steady = (collector.tiles_done - first[1]) / (end - first[0])
        stats = {
            "slides": len(self.todo), "tile_encodings": collector.tiles_done,
            "transforms": len(self.transforms), "wall_s": end - self.start,
            "first_batch_s": None if first is None else first[0] - self.start,
            "tiles_per_s": rate, "steady_tiles_per_s": steady, "duplicate_rows_ignored": collector.duplicates,
            "actor_read_s": collector.actor_read_s, "actor_encode_s": collector.actor_encode_s,
            "precision": sorted(name for name, code in PRECISION_CODES.items() if code in collector.precision_codes),
        }
        self.progress.finish(extra=f"{collector.tiles_done} {self.unit} ({rate:.0f}/s)"
                             + (f", {collector.duplicates} duplicate rows from retried tasks ignored"
                                if collector.duplicates else ""))
        return stats
