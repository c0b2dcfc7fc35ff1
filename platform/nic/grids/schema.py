"""The feature-grid format: Arrow schema, on-disk layout and the metadata every grid file carries.

One Parquet file per slide, hive-partitioned by slide so that pyarrow.dataset, DuckDB and Polars read
the whole store as one table:

    grids/slides.parquet                              manifest, one row per input slide
    grids/tiles/slide_id=<id>/part-0.parquet          that slide's tile rows

Temporaries are written under grids/.staging/ and renamed into tiles/, so the tiles/ tree only
ever holds complete files (and a plain directory scan never meets a half-written one).

A grid file holds the tissue tiles of one slide under one or more of the 8 dihedral transforms
(`transform` column, 0 = identity; see nic.grids.dihedral). `row`/`col` are the tile's position in
the grid *of its transform*; `x`/`y` are the level-0 pixel corner of the source tile in the original
slide, whatever the transform, so every row can be traced back to its pixels.

A grid compressed with `--heads` has, after `transform`, one float32 column per head output of its
multitask encoder (named `head:<task>` or `head:<task>=<class>`, nic.encoders.head_maps), listed in
its metadata as `nic.head_columns`; without heads neither the columns nor that key exist, so such
files are byte for byte what they were before head maps.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa

FORMAT_VERSION = "1"
META_PREFIX = "nic."
TILES_DIR = "tiles"
STAGING_DIR = ".staging"
MANIFEST_NAME = "slides.parquet"
PART_NAME = "part-0.parquet"

# Slide ids become folder names (hive partition values); keep them to characters every reader
# (and every filesystem) leaves alone.
_SAFE_ID = re.compile(r"^[A-Za-z0-9._+-]+$")


class GridError(ValueError):
    """A grid store, file or slide that cannot be used; the message names the file and the problem."""


BASE_COLUMNS = ("slide_id", "row", "col", "x", "y", "tissue", "embedding", "transform")


def tile_schema(embedding_dim: int, head_columns: tuple[str, ...] = ()) -> pa.Schema:
    """Arrow schema of a grid file's rows (DESIGN.md's columns plus `transform`, then any head
    columns as float32)."""
    if embedding_dim < 1:
        raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
    clash = sorted(set(head_columns) & set(BASE_COLUMNS))
    if clash or len(set(head_columns)) != len(head_columns):
        raise ValueError(f"head columns must be unique and differ from the grid's own columns: {list(head_columns)}")
    return pa.schema(
        [
            ("slide_id", pa.string()),
            ("row", pa.int32()),
            ("col", pa.int32()),
            ("x", pa.int64()),
            ("y", pa.int64()),
            ("tissue", pa.float32()),
            ("embedding", pa.list_(pa.float16(), embedding_dim)),
            ("transform", pa.int8()),
        ]
        + [(name, pa.float32()) for name in head_columns]
    )


def check_slide_id(slide_id: str) -> str:
    """A slide id usable as a partition folder name, or a GridError saying why not."""
    if not slide_id or slide_id in (".", "..") or not _SAFE_ID.match(slide_id):
        raise GridError(
            f"slide id {slide_id!r} cannot name a grid partition: use only letters, digits and . _ + -"
        )
    return slide_id


def tiles_dir(grids_dir: str | Path) -> Path:
    return Path(grids_dir) / TILES_DIR


def slide_dir(grids_dir: str | Path, slide_id: str) -> Path:
    return tiles_dir(grids_dir) / f"slide_id={check_slide_id(slide_id)}"


def slide_file(grids_dir: str | Path, slide_id: str) -> Path:
    return slide_dir(grids_dir, slide_id) / PART_NAME


def manifest_path(grids_dir: str | Path) -> Path:
    return Path(grids_dir) / MANIFEST_NAME


def staging_dir(grids_dir: str | Path) -> Path:
    return Path(grids_dir) / STAGING_DIR


@dataclass(frozen=True)
class GridMeta:
    """What a grid file says about itself (Parquet key-value metadata, keys prefixed `nic.`).

    `rows`/`cols` are the identity grid's shape; transform k's shape is `shape(k)`. `tiles` is the
    number of tissue tiles per transform, so a complete file has tiles * len(transforms) rows.
    `head_columns` names the float32 head-map columns (`--heads`; empty without).
    """

    slide_id: str
    path: str
    rows: int
    cols: int
    tile_px: int
    mpp: float
    level: int
    tiles: int
    embedding_dim: int
    encoder_name: str
    encoder_hash: str
    transforms: tuple[int, ...] = (0,)
    base_mpp: float | None = None
    options_hash: str = ""
    format_version: str = FORMAT_VERSION
    extra: dict = field(default_factory=dict)
    head_columns: tuple[str, ...] = ()

    def shape(self, transform: int = 0) -> tuple[int, int]:
        """(H, W) of the grid under `transform` (odd transforms swap the axes)."""
        return (self.cols, self.rows) if transform % 2 else (self.rows, self.cols)

    @property
    def expected_rows(self) -> int:
        return self.tiles * len(self.transforms)

    def to_metadata(self) -> dict[bytes, bytes]:
        out = {}
        for key, value in asdict(self).items():
            if key == "head_columns" and not value:  # grids without heads keep their exact bytes
                continue
            text = json.dumps(list(value) if isinstance(value, tuple) else value, sort_keys=True)
            out[(META_PREFIX + key).encode()] = text.encode()
        return out

    @classmethod
    def from_metadata(cls, metadata: dict[bytes, bytes] | None, source: str | Path) -> GridMeta:
        """Parse the metadata of a grid file; GridError naming `source` when it is not one."""
        meta = {}
        for key, value in (metadata or {}).items():
            name = key.decode(errors="replace")
            if name.startswith(META_PREFIX):
                try:
                    meta[name[len(META_PREFIX):]] = json.loads(value.decode())
                except (ValueError, UnicodeDecodeError) as exc:
                    raise GridError(f"{source}: metadata key {name!r} is not valid JSON: {exc}") from None
        known = set(cls.__dataclass_fields__)
        missing = [k for k in ("slide_id", "rows", "cols", "tile_px", "tiles", "embedding_dim", "encoder_hash")
                   if k not in meta]
        if missing:
            raise GridError(f"{source}: not a nic grid file (metadata lacks {', '.join('nic.' + k for k in missing)})")
        args = {k: v for k, v in meta.items() if k in known}
        args["transforms"] = tuple(int(t) for t in args.get("transforms", [0]))
        args["extra"] = dict(args.get("extra") or {})
        args["head_columns"] = tuple(str(c) for c in args.get("head_columns") or ())
        return cls(**args)
