"""The overview PNG of `nic tile`: the tissue tint is exact and the PNG holds the rendered pixels."""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from nic.config.slides import SlideOptions
from nic.slides import open_slide, plan_slide
from nic.tiling.overview import MASK_TINT, render_overview


def _tint_by_arithmetic(thumb: Image.Image, mask: np.ndarray) -> np.ndarray:
    """The tint as first written: 0.7 x pixel + 0.3 x tint on the whole image in float32."""
    small = Image.fromarray(mask.astype(np.uint8) * 255).resize(thumb.size, Image.NEAREST)
    pixels = np.asarray(thumb, dtype=np.float32)
    return np.where((np.asarray(small) > 0)[..., None], 0.7 * pixels + 0.3 * MASK_TINT, pixels).astype(np.uint8)


def test_tissue_tint_by_lookup_is_the_arithmetic_tint(real_slide):
    plan = plan_slide(real_slide, SlideOptions())
    assert 0.05 < plan.tissue.fraction < 0.95  # both tinted and untinted pixels are compared
    bare = dataclasses.replace(plan, keep=np.zeros_like(plan.keep))  # no tile outlines drawn over the tint
    with open_slide(real_slide) as slide:
        got = np.asarray(render_overview(slide, bare, 300))
        expected = _tint_by_arithmetic(slide.get_thumbnail((300, 300)).convert("RGB"), plan.tissue.mask)
    np.testing.assert_array_equal(got, expected)


def test_overview_png_holds_the_rendered_pixels(real_slide, tmp_path):
    """The tile stage writes the overview at a fast zlib level: lossless, the same pixels."""
    from nic.tiling.worker import PNG_LEVEL

    plan = plan_slide(real_slide, SlideOptions())
    with open_slide(real_slide) as slide:
        image = render_overview(slide, plan, 256)
    image.save(tmp_path / "o.png", format="PNG", compress_level=PNG_LEVEL)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o.png").convert("RGB")), np.asarray(image))
