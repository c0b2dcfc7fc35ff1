"""`nic grids show --channel NAME`: one per-tile value (a head map such as tumour probability or
nucleus count, or one embedding channel) drawn over the slide's thumbnail with a colour bar.

The map is laid over the thumbnail where the grid sits on the slide (tile i covers level-0 pixels
[i * tile, (i + 1) * tile) with tile = tile_px * mpp / base_mpp), so a pathologist sees the
prediction on the tissue it came from. Off-tissue cells are transparent. Under a rotation/flip
(transform 1-7) or without a readable slide the map is drawn on its own beside the thumbnail.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nic.grids.channels import load_channel
from nic.grids.dihedral import TRANSFORM_NAMES, transform_image
from nic.grids.reader import read_grid_meta
from nic.grids.show import save_png, slide_thumbnail

OVERLAY_ALPHA = 0.7


def colour_range(values: np.ndarray) -> tuple[float, float]:
    """(vmin, vmax) of the colour bar: 0..1 for values that are all in it (probabilities,
    fractions), so maps of different slides compare; else the tissue's min..max."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    if lo >= 0.0 and hi <= 1.0:
        return 0.0, 1.0
    return (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)


def render_channel_png(
    grids_dir: str | Path, slide_id: str, channel: str, out: str | Path, transform: int = 0,
    thumbnail_px: int = 1024, slide_path: str | None = None, cmap: str = "viridis",
) -> Path:
    """Draw `channel` of slide `slide_id` over (or beside) its thumbnail with a colour bar; PNG at `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = read_grid_meta(grids_dir, slide_id)
    values, mask = load_channel(grids_dir, slide_id, channel, transform, fetch=False)
    found = slide_thumbnail(slide_path or meta.path, thumbnail_px)
    vmin, vmax = colour_range(values)
    overlay = found is not None and transform == 0 and meta.base_mpp
    fig, axes = plt.subplots(1, 2, figsize=(12, 6), squeeze=False)
    left, right = axes[0]
    if found is not None:
        thumb, (width, _) = found
        left.imshow(transform_image(thumb, transform))
        left.set_title(f"{slide_id}: slide" + (f" ({TRANSFORM_NAMES[transform]})" if transform else ""))
    else:
        left.text(0.5, 0.5, f"slide not readable at\n{slide_path or meta.path}", ha="center", va="center",
                  fontsize=9, transform=left.transAxes)
    h, w = mask.shape
    if overlay:
        scale = thumb.shape[1] / width
        assert meta.base_mpp  # `overlay` needs it
        tile = meta.tile_px * meta.mpp / float(meta.base_mpp) * scale  # one tile in thumbnail pixels
        right.imshow(thumb, alpha=0.5)
        image = right.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=vmin, vmax=vmax, alpha=OVERLAY_ALPHA,
                             interpolation="nearest", extent=(0, w * tile, h * tile, 0))
        right.set_xlim(0, thumb.shape[1])
        right.set_ylim(thumb.shape[0], 0)
    else:
        image = right.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=vmin, vmax=vmax,
                             interpolation="nearest")
    fig.colorbar(image, ax=right, fraction=0.046, pad=0.04, label=channel)
    finite = values[mask]
    right.set_title(f"{channel}: {int(mask.sum())} tiles, grid {h} x {w}\n"
                    f"mean {np.mean(finite):.3g}, min {np.min(finite, initial=np.inf):.3g}, "
                    f"max {np.max(finite, initial=-np.inf):.3g}; encoder {meta.encoder_name} "
                    f"({meta.encoder_hash[:8]})", fontsize=9)
    for a in (left, right):
        a.set_xticks([])
        a.set_yticks([])
    fig.tight_layout()
    return save_png(fig, out)
