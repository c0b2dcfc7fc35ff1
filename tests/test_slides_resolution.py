"""Resolution: metadata, plausibility, assume_mpp, and the choice of pyramid level."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from nic.config.slides import SlideOptions
from nic.slides import SlideError, mpp_from_properties, open_slide, plan_slide, resolve_resolution
from slide_factory import write_tiled_tiff


def _slide(tmp_path, name, mpp, levels, size=(600, 800)):
    image = np.full((*size, 3), 200, np.uint8)
    return write_tiled_tiff(tmp_path / name, image, mpp, tile=128, levels=levels)


def _resolve(path, **options):
    with open_slide(path) as slide:
        return resolve_resolution(slide, SlideOptions(**options), path)


def test_exact_level_zero(tmp_path):
    res = _resolve(_slide(tmp_path, "a.tiff", 0.5, 3))
    assert (res.level, res.exact, res.scale) == (0, True, 1.0)
    assert res.base_mpp == pytest.approx(0.5) and res.level_mpp == pytest.approx(0.5)
    assert res.mpp_source == "metadata" and res.mpp_origin == "openslide.mpp-x/y"
    assert res.note == ""


def test_quarter_micron_40x_slide_reads_the_half_resolution_level(tmp_path):
    res = _resolve(_slide(tmp_path, "b.tiff", 0.25, 3))
    assert res.level == 1 and res.level_downsample == pytest.approx(2.0)
    assert res.level_mpp == pytest.approx(0.5) and res.exact and res.scale == 1.0


def test_quarter_micron_single_level_is_downsampled(tmp_path):
    res = _resolve(_slide(tmp_path, "c.tiff", 0.25, 1))
    assert res.level == 0 and not res.exact
    assert res.scale == pytest.approx(2.0)
    assert "downsampled" in res.note


def test_between_levels_reads_the_finer_level_and_downsamples(tmp_path):
    # levels at 0.2, 0.4, 0.8 um/px: 0.4 is the coarsest not coarser than 0.5 (0.8 would lose detail)
    res = _resolve(_slide(tmp_path, "d.tiff", 0.2, 3))
    assert res.level == 1 and not res.exact
    assert res.level_mpp == pytest.approx(0.4)
    assert res.scale == pytest.approx(1.25)


def test_within_tolerance_counts_as_exact(tmp_path):
    path = _slide(tmp_path, "e.tiff", 0.27, 2)  # level 1 = 0.54 um/px, within 10 % of 0.5
    res = _resolve(path)
    assert res.level == 1 and res.exact and res.scale == 1.0
    strict = _resolve(path, mpp_tolerance=0.05)  # 0.54 is now too coarse: read 0.27 and shrink
    assert strict.level == 0 and not strict.exact
    assert strict.scale == pytest.approx(0.5 / 0.27)


def test_coarse_slide_is_upsampled_and_says_so(tmp_path):
    res = _resolve(_slide(tmp_path, "f.tiff", 1.0, 2))
    assert res.level == 0 and not res.exact and res.scale == pytest.approx(0.5)
    assert "upsampled" in res.note


def test_real_svs_is_exact_at_half_micron(real_slide):
    res = _resolve(real_slide)
    assert res.base_mpp == pytest.approx(0.499)
    assert (res.level, res.exact, res.scale) == (0, True, 1.0)


def test_missing_mpp_is_an_error_unless_assumed(tmp_path):
    path = _slide(tmp_path, "nompp.tiff", None, 2)
    with pytest.raises(SlideError) as err:
        _resolve(path)
    assert err.value.kind == "no_mpp"
    assert str(err.value).startswith(f"{path}: no usable resolution metadata")
    assert "set slide.assume_mpp" in str(err.value)
    res = _resolve(path, assume_mpp=0.25)
    assert res.mpp_source == "assumed" and res.base_mpp == 0.25
    assert res.level == 1 and res.exact  # the 2-level pyramid now has a 0.5 um/px level
    assert "assumed" in res.note


def test_boxes_tiff_absurd_resolution_is_rejected_then_accepted_with_assume(shared_slides):
    path = shared_slides / "boxes.tiff"
    with pytest.raises(SlideError) as err:
        _resolve(path)
    assert err.value.kind == "bad_mpp"
    assert str(err.value) == f"{path}: resolution 352.8 um/px is not plausible (max 20); set slide.assume_mpp"
    res = _resolve(path, assume_mpp=0.5)
    assert res.mpp_source == "assumed" and res.base_mpp == 0.5 and res.level == 0 and res.exact
    assert "352.8" in res.note


def test_plausibility_limit_is_configurable(tmp_path):
    path = _slide(tmp_path, "h.tiff", 0.5, 1)
    with pytest.raises(SlideError, match=r"resolution 0.5 um/px is not plausible \(max 0.4\)") as err:
        _resolve(path, max_plausible_mpp=0.4)
    assert err.value.kind == "bad_mpp"


def test_small_svs_is_too_small(shared_slides):
    path = shared_slides / "small.svs"
    with pytest.raises(SlideError) as err:
        plan_slide(path, SlideOptions())
    assert err.value.kind == "too_small"
    assert str(err.value).startswith(f"{path}: too small: 16 x 16 px at 0.499 um/px holds no 128 px tile")


def test_properties_fallbacks():
    assert mpp_from_properties({"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.27"}) == (
        pytest.approx(0.26), "openslide.mpp-x/y")
    assert mpp_from_properties({"openslide.mpp-x": "0.5"})[0] == pytest.approx(0.5)
    # no openslide.mpp: TIFF resolution tags with a physical unit
    mpp, origin = mpp_from_properties({"tiff.XResolution": "20000", "tiff.YResolution": "20000",
                                       "tiff.ResolutionUnit": "centimeter"})
    assert mpp == pytest.approx(0.5) and "centimeter" in origin
    mpp, _ = mpp_from_properties({"tiff.XResolution": "50800", "tiff.ResolutionUnit": "inch"})
    assert mpp == pytest.approx(0.5)
    mpp, why = mpp_from_properties({"tiff.XResolution": "72", "tiff.ResolutionUnit": "none"})
    assert mpp is None and "no physical unit" in why
    assert mpp_from_properties({"openslide.mpp-x": "garbage"}) == (None, "openslide.mpp-x missing")


def test_resolution_plan_is_picklable(tmp_path):
    res = _resolve(_slide(tmp_path, "g.tiff", 0.2, 3))
    assert pickle.loads(pickle.dumps(res)) == res
