"""The NIC paper's picture of a compressed slide: its thumbnail beside the grid's embeddings
projected to RGB by PCA, so that tissue types that the encoder tells apart show as different colours.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nic.grids.dihedral import TRANSFORM_NAMES, transform_image
from nic.grids.reader import load_grid, read_grid_meta
from nic.grids.schema import GridError
from nic.storage import local_path


def pca_rgb(grid: np.ndarray, mask: np.ndarray, percentiles: tuple[float, float] = (1.0, 99.0)) -> np.ndarray:
    """(H, W, 3) float image in [0, 1]: the first 3 principal components of the tissue cells' embeddings,
    each stretched between its percentiles; background white. Fewer than 3 components (C < 3 or too
    few tiles) leave the remaining channels at mid grey."""
    from sklearn.decomposition import PCA

    c, h, w = grid.shape
    image = np.ones((h, w, 3), dtype=np.float32)
    vectors = grid[:, mask].T  # (N, C)
    n = vectors.shape[0]
    if n == 0:
        return image
    k = min(3, c, n)
    coloured = np.full((n, 3), 0.5, dtype=np.float32)
    if k >= 1 and n >= 2 and np.ptp(vectors, axis=0).max() > 0:
        comps = PCA(n_components=k, svd_solver="full").fit_transform(vectors.astype(np.float64))
        lo, hi = np.percentile(comps, percentiles, axis=0)
        span = np.where(hi - lo > 1e-12, hi - lo, 1.0)
        coloured[:, :k] = np.clip((comps - lo) / span, 0.0, 1.0)
    image[mask] = coloured
    return image


def slide_thumbnail(path: str, max_px: int) -> tuple[np.ndarray, tuple[int, int]] | None:
    """(RGB thumbnail, level-0 (width, height)) of a slide, or None when it cannot be read."""
    try:
        from nic.slides import open_slide

        with open_slide(local_path(path)) as slide:  # a file or a DICOM slide's folder (fetched if a URI)
            thumb = np.asarray(slide.get_thumbnail((max_px, max_px)).convert("RGB"))
            size = tuple(int(v) for v in slide.dimensions)
    except Exception:  # a moved or unreadable slide: draw the grid alone, say so in the title
        return None
    return thumb, (size[0], size[1])


def _thumbnail(path: str, transform: int, max_px: int) -> np.ndarray | None:
    found = slide_thumbnail(path, max_px)
    return None if found is None else transform_image(found[0], transform)


def save_png(fig, out: str | Path) -> Path:
    """Write a matplotlib figure as a PNG at `out`, atomically, and close it."""
    import matplotlib.pyplot as plt

    from nic.artifacts import atomic_path

    out = Path(out)
    if out.suffix.lower() != ".png":
        plt.close(fig)
        raise GridError(f"{out}: the picture is written as PNG, so the file name must end in .png")
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return out


def render_grid_png(
    grids_dir: str | Path, slide_id: str, out: str | Path, transform: int = 0, thumbnail_px: int = 1024,
    slide_path: str | None = None,
) -> Path:
    """Draw slide `slide_id`'s thumbnail (read with OpenSlide from the path its grid records, or
    `slide_path`) beside its PCA-RGB grid, and save it as a PNG at `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = read_grid_meta(grids_dir, slide_id)
    grid, mask = load_grid(grids_dir, slide_id, transform)
    image = pca_rgb(grid, mask)
    thumb = _thumbnail(slide_path or meta.path, transform, thumbnail_px)

    panels = 2 if thumb is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 6), squeeze=False)
    axes = axes[0]
    if thumb is not None:
        axes[0].imshow(thumb)
        axes[0].set_title(f"{slide_id}: slide" + (f" ({TRANSFORM_NAMES[transform]})" if transform else ""))
    h, w = mask.shape
    ax = axes[-1]
    ax.imshow(image, interpolation="nearest")
    ax.set_title(f"grid {h} x {w}, C={meta.embedding_dim}, {int(mask.sum())} tiles\n"
                 f"PCA to RGB; encoder {meta.encoder_name} ({meta.encoder_hash[:8]})"
                 + ("" if thumb is not None else f"\n(slide not readable at {slide_path or meta.path})"),
                 fontsize=9)
    for a in axes:
        a.set_xticks([])
        a.set_yticks([])
    fig.tight_layout()
    return save_png(fig, out)
