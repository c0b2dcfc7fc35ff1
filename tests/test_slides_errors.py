"""Every kind of bad slide gives a SlideError with the right kind and a message naming the file."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
from PIL import Image

from nic.config.slides import SlideOptions
from nic.slides import KINDS, SlideError, TileGrid, TileReader, open_slide, plan_slide


@pytest.mark.parametrize(
    "name, kind, problem",
    [
        ("unopenable.tiff", "unopenable", "OpenSlide cannot open it (Unsupported TIFF compression: 52479)"),
        ("boxes.tiff", "bad_mpp", "resolution 352.8 um/px is not plausible (max 20); set slide.assume_mpp"),
        ("small.svs", "too_small", "too small: 16 x 16 px at 0.499 um/px holds no 128 px tile"),
        ("unreadable.svs", "unreadable", "pixels cannot be read (Bogus marker length)"),
    ],
)
def test_bad_fixtures(shared_slides, name, kind, problem):
    path = shared_slides / name
    with pytest.raises(SlideError) as err:
        plan_slide(path, SlideOptions())
    assert err.value.kind == kind
    assert str(err.value).startswith(f"{path}: {problem}")
    assert err.value.path == str(path)


def test_good_fixture_plans(real_slide):
    plan = plan_slide(real_slide, SlideOptions())
    assert plan.slide_id == "small_HE" and plan.vendor == "aperio"
    assert (plan.width, plan.height) == (2220, 2967)


def test_unreadable_pixels_fail_on_both_read_paths(shared_slides):
    path = shared_slides / "unreadable.svs"
    with open_slide(path) as slide:
        from nic.slides import resolve_resolution

        res = resolve_resolution(slide, SlideOptions(), path)
    grid = TileGrid(16, 16, res.base_mpp, 0.5, 8)
    for direct in (None, False):
        with TileReader(path, res, grid, direct=direct) as reader:
            if direct is None:
                assert reader.mode == "direct"
            with pytest.raises(SlideError) as err:
                reader.read([0], [0])
        assert err.value.kind == "unreadable"
        assert str(err.value).startswith(f"{path}: pixels cannot be read (Bogus marker length)")


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.svs"
    path.touch()
    with pytest.raises(SlideError) as err:
        open_slide(path)
    assert (err.value.kind, str(err.value)) == ("empty", f"{path}: file is empty (0 bytes)")


def test_text_file_named_svs(tmp_path):
    path = tmp_path / "notes.svs"
    path.write_text("patient 12, stain H&E\n")
    with pytest.raises(SlideError) as err:
        plan_slide(path, SlideOptions())
    assert (err.value.kind, str(err.value)) == ("not_a_slide", f"{path}: not a slide (text file?)")


def test_plain_png_named_tiff(tmp_path):
    path = tmp_path / "photo.tiff"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path, format="PNG")
    with pytest.raises(SlideError) as err:
        open_slide(path)
    assert err.value.kind == "not_a_slide" and "a plain PNG image" in str(err.value)


def test_directory_named_svs(tmp_path):
    path = tmp_path / "x.svs"
    path.mkdir()
    with pytest.raises(SlideError) as err:
        plan_slide(path, SlideOptions())
    assert (err.value.kind, str(err.value)) == (
        "directory", f"{path}: is a directory, not a slide file (nor a DICOM slide: it holds no .dcm files)")


def test_missing_path(tmp_path):
    path = tmp_path / "gone.svs"
    with pytest.raises(SlideError) as err:
        plan_slide(path, SlideOptions())
    assert (err.value.kind, str(err.value)) == ("missing", f"{path}: no such file")


@pytest.mark.parametrize(
    "keep_bytes, problem",
    [
        (600_000, "no readable image directory: the file is damaged or truncated (600000 bytes)"),
        (1_938_000, "the TIFF structure is damaged or the file is truncated at 1938000 bytes"),
    ],
)
def test_truncated_slide_says_truncated(tmp_path, real_slide, keep_bytes, problem):
    """A slide cut off mid-copy: OpenSlide calls it an unsupported format; we say what happened."""
    path = tmp_path / "cut.svs"
    shutil.copyfile(real_slide, path)
    with open(path, "r+b") as fh:
        fh.truncate(keep_bytes)
    with pytest.raises(SlideError) as err:
        plan_slide(path, SlideOptions())
    assert err.value.kind == "unopenable"
    assert str(err.value).startswith(f"{path}: OpenSlide cannot open it ({problem}")


def test_error_pickles_with_its_fields():
    err = SlideError("/x/a.svs", "file is empty (0 bytes)", "empty")
    back = pickle.loads(pickle.dumps(err))
    assert (str(back), back.kind, back.path, back.problem) == (str(err), "empty", "/x/a.svs", err.problem)


def test_one_construction_form_and_unknown_kind():
    """SlideError(path, problem, kind) is the only form: a ready message without its parts is refused."""
    for err in (SlideError("/x/a.svs", "no tissue", "no_tissue"), SlideError("/x/a.svs", "no tissue", kind="no_tissue"),
                SlideError(path="/x/a.svs", problem="no tissue", kind="no_tissue")):
        assert (str(err), err.kind, err.path, err.problem) == ("/x/a.svs: no tissue", "no_tissue", "/x/a.svs",
                                                               "no tissue")
    assert (str(SlideError(None, "no file", "missing")), SlideError(None, "no file", "missing").path) == ("no file", None)
    with pytest.raises(TypeError, match="SlideError"):
        SlideError("just a message")
    with pytest.raises(TypeError, match="SlideError"):
        SlideError("/x/a.svs: no tissue", kind="no_tissue")
    assert set(KINDS) >= {"missing", "empty", "directory", "unopenable", "no_mpp", "bad_mpp", "too_small",
                          "unreadable", "no_tissue"}
    with pytest.raises(ValueError, match="unknown SlideError kind"):
        SlideError("x", "a problem", "weird")
