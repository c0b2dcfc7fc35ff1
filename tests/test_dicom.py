"""DICOM whole-slide images: a folder of .dcm instances is one slide, read like the SVS it came from.

The DICOM fixtures are made at test time from the real H&E fixture `small_HE.svs` with wsidicomizer
(a dev extra), through its OpenSlide source: it reads the SVS with the same OpenSlide nic uses and
writes the pixels it gets. (Its default source, opentile, would copy the SVS's own JPEG tiles
unchanged, but needs the system library libturbojpeg, which a pip install does not bring.) Three
fixtures:

- `dicom_slide`: uncompressed frames, so the DICOM holds exactly the SVS's pixels and everything
  nic derives from them (resolution, tissue mask, tile grid, tiles, grids) must be *equal*;
- `dicom_jpeg_slide`: baseline JPEG at wsidicomizer's defaults (quality 80, 4:2:0), as most scanners
  and converters write DICOM WSI: re-encoding changes pixels by a few levels, so geometry is equal
  and tissue, tiles and grids are compared with tolerances;
- `dicom_pyramid`: a 4-level pyramid (one instance per level, as scanners write them), converted
  from a lossless pyramidal TIFF of the same pixels: nic must pick the same levels as for the TIFF.

The end-to-end tests (`nic tile`, `nic compress`) start Ray; the rest do not.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from nic.config.slides import SlideOptions
from nic.slides import SlideError, TileReader, metadata_mpp, open_slide, plan_slide, resolve_resolution
from nic.slides.inputs import expand_slide_inputs

DICOMIZER_MISSING = ("wsidicomizer is not installed (it makes the DICOM fixtures; it comes with the dev "
                     "extra: pip install -e '.[dev]')")
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage


def dicomize(source: Path, out: Path, encoding) -> list[Path]:
    """`source` as a DICOM WSI folder `out` (one instance per level, plus label, overview, thumbnail)."""
    from wsidicomizer import WsiDicomizer
    from wsidicomizer.wsidicomizer import SourceIdentifier

    WsiDicomizer.convert(source, out, encoding=encoding, preferred_source=SourceIdentifier.OPENSLIDE,
                         tile_size=256, workers=1)
    return sorted(out.glob("*.dcm"))


@pytest.fixture(scope="session")
def dicom_root(tmp_path_factory, real_slide) -> Path:
    """A cohort folder: the SVS (a link) beside its lossless DICOM copy `small_HE_dicom/`."""
    pytest.importorskip("wsidicomizer", reason=DICOMIZER_MISSING)
    from wsidicom.codec.settings import NumpySettings

    root = tmp_path_factory.mktemp("dicom") / "cohort"
    root.mkdir()
    (root / "small_HE.svs").symlink_to(real_slide)
    files = dicomize(real_slide, root / "small_HE_dicom", NumpySettings())
    assert len(files) >= 2, f"expected a folder of DICOM instances, got {files}"
    return root


@pytest.fixture(scope="session")
def dicom_slide(dicom_root) -> Path:
    return dicom_root / "small_HE_dicom"


@pytest.fixture(scope="session")
def dicom_jpeg_slide(tmp_path_factory, real_slide) -> Path:
    pytest.importorskip("wsidicomizer", reason=DICOMIZER_MISSING)
    from wsidicom.codec.settings import JpegSettings

    out = tmp_path_factory.mktemp("dicom-jpeg") / "small_HE_jpeg"
    dicomize(real_slide, out, JpegSettings())
    return out


@pytest.fixture(scope="session")
def dicom_pyramid(tmp_path_factory, real_slide) -> tuple[Path, Path, list[Path]]:
    """(lossless 4-level pyramidal TIFF of small_HE's pixels, its DICOM folder, the folder's instances)."""
    pytest.importorskip("wsidicomizer", reason=DICOMIZER_MISSING)
    from wsidicom.codec.settings import NumpySettings

    from slide_factory import write_tiled_tiff

    folder = tmp_path_factory.mktemp("dicom-pyramid")
    with open_slide(real_slide) as slide:
        pixels = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
        mpp, _ = metadata_mpp(slide)
    tiff = write_tiled_tiff(folder / "pyramid.tiff", pixels, mpp=mpp, tile=256, levels=4, compression="deflate")
    return tiff, folder / "pyramid_dicom", dicomize(tiff, folder / "pyramid_dicom", NumpySettings())


def _copy(folder: Path, to: Path) -> Path:
    shutil.copytree(folder, to)
    return to


# --- reading: the DICOM slide is the SVS -------------------------------------------------------


def test_each_instance_belongs_to_one_dicom_wsi_series(dicom_slide):
    pydicom = pytest.importorskip("pydicom")
    files = sorted(dicom_slide.glob("*.dcm"))
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert {h.SOPClassUID for h in headers} == {WSI_SOP_CLASS}
    assert len({h.SeriesInstanceUID for h in headers}) == 1
    kinds = sorted(h.ImageType[2] for h in headers)
    assert kinds.count("VOLUME") == 1 and {"LABEL", "OVERVIEW"} <= set(kinds), kinds
    volume = next(h for h in headers if h.ImageType[2] == "VOLUME")
    # PixelSpacing is in mm per pixel: 0.000499 mm = the SVS's 0.499 um/px
    spacing = volume.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    assert [float(v) for v in spacing] == pytest.approx([0.000499, 0.000499])


def test_the_folder_opens_with_the_svs_geometry_and_resolution(dicom_slide, real_slide):
    with open_slide(real_slide) as svs, open_slide(dicom_slide, verify=True) as dcm:
        assert dcm.properties["openslide.vendor"] == "dicom"
        assert dcm.dimensions == svs.dimensions == (2220, 2967)
        assert dcm.level_count == svs.level_count
        assert dcm.level_dimensions == svs.level_dimensions
        assert dcm.level_downsamples == svs.level_downsamples
        assert metadata_mpp(dcm) == metadata_mpp(svs) == (pytest.approx(0.499), "openslide.mpp-x/y")
        assert float(dcm.properties["openslide.mpp-x"]) == pytest.approx(0.499)
        assert float(dcm.properties["openslide.mpp-y"]) == pytest.approx(0.499)


def test_any_instance_opens_the_whole_slide(dicom_slide):
    """OpenSlide gathers the series from the instance's folder: whichever file it is given."""
    import openslide

    for path in sorted(dicom_slide.glob("*.dcm")):
        with openslide.OpenSlide(str(path)) as slide:
            assert slide.dimensions == (2220, 2967), path.name


@pytest.mark.parametrize("target_mpp", [0.5, 1.0])
def test_plan_and_tiles_equal_the_svs(dicom_slide, real_slide, target_mpp):
    """Same resolution plan, tissue mask, tile grid and kept tiles, and pixel-identical tiles: at
    0.5 um/px (level 0 read as is) and at 1.0 um/px (level 0 read and downsampled)."""
    options = SlideOptions(target_mpp=target_mpp)
    svs = plan_slide(real_slide, options)
    dcm = plan_slide(dicom_slide, options)
    assert dcm.vendor == "dicom" and svs.vendor == "aperio"
    assert dcm.resolution == svs.resolution
    assert dcm.resolution.base_mpp == pytest.approx(0.499) and dcm.resolution.level == 0
    assert dcm.grid == svs.grid
    np.testing.assert_array_equal(dcm.tissue.mask, svs.tissue.mask)
    np.testing.assert_array_equal(dcm.fractions, svs.fractions)
    np.testing.assert_array_equal(dcm.keep, svs.keep)
    assert svs.tile_count > 20
    for a, b in zip(svs.tiles(), dcm.tiles()):
        np.testing.assert_array_equal(a, b)

    rows, cols, *_ = svs.tiles()
    with TileReader.from_plan(svs) as a, TileReader.from_plan(dcm) as b:
        assert b.mode == "region"  # DICOM frames are read through OpenSlide
        if target_mpp == 0.5:
            assert a.mode == "direct" and b.direct_reason == "format dicom"
        np.testing.assert_array_equal(b.read(rows, cols), a.read(rows, cols))


def test_a_jpeg_dicom_gives_the_same_grid_and_nearly_the_same_tissue_and_tiles(dicom_jpeg_slide, real_slide):
    """Re-encoding as JPEG (quality 80, 4:2:0) changes pixels a little: geometry is equal, tissue and
    tiles agree within what lossy compression explains."""
    options = SlideOptions()
    svs = plan_slide(real_slide, options)
    dcm = plan_slide(dicom_jpeg_slide, options)
    assert dcm.resolution == svs.resolution and dcm.grid == svs.grid
    assert (dcm.tissue.mask == svs.tissue.mask).mean() > 0.995
    assert abs(dcm.tile_count - svs.tile_count) <= 3
    assert (dcm.keep & svs.keep).sum() / (dcm.keep | svs.keep).sum() > 0.97
    assert np.abs(dcm.fractions - svs.fractions).max() < 0.25

    rows, cols, *_ = svs.tiles()
    with TileReader.from_plan(svs) as a, TileReader.from_plan(dcm) as b:
        ta, tb = a.read(rows, cols).astype(np.float32), b.read(rows, cols).astype(np.float32)
    assert np.abs(ta - tb).mean() < 10  # measured 6.0 (0-255 scale): JPEG noise, not another image
    # each tile's mean colour (what mean-rgb encodes) moves by less than 2 levels (measured 0.8)
    assert np.abs(ta.mean(axis=(1, 2)) - tb.mean(axis=(1, 2))).max() < 2.0


@pytest.mark.parametrize(("target_mpp", "level"), [(0.5, 0), (2.0, 2)])
def test_a_dicom_pyramid_resolves_the_levels_the_tiff_does(dicom_pyramid, target_mpp, level):
    """One instance per level: OpenSlide's downsamples and um/px per level from the DICOM agree with
    the source TIFF's, so nic reads the same level and masks tissue on the same low level. (Lower
    levels are pixel-equal only at level 0: the converter re-renders the lower levels itself.)"""
    tiff, folder, files = dicom_pyramid
    with open_slide(tiff) as a, open_slide(folder) as b:
        assert b.level_count == a.level_count == 4
        assert b.level_dimensions == a.level_dimensions
        np.testing.assert_allclose(b.level_downsamples, a.level_downsamples)
        assert metadata_mpp(b)[0] == pytest.approx(metadata_mpp(a)[0])
    assert len(files) >= 4
    options = SlideOptions(target_mpp=target_mpp)
    pa, pb = plan_slide(tiff, options), plan_slide(folder, options)
    assert pb.resolution == pa.resolution and pb.resolution.level == level and pb.resolution.exact
    assert pb.grid == pa.grid
    assert pb.tissue.level == pa.tissue.level > 0
    assert (pb.tissue.mask == pa.tissue.mask).mean() > 0.99
    if level == 0:
        rows, cols, *_ = pa.tiles()
        with TileReader.from_plan(pa) as ra, TileReader.from_plan(pb) as rb:
            np.testing.assert_array_equal(rb.read(rows, cols), ra.read(rows, cols))


# --- naming: a folder of DICOM instances is one slide -------------------------------------------


def _fake_dicom_folder(folder: Path, n: int = 3) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        (folder / f"1.2.3.{i}.dcm").write_bytes(b"\0" * 128 + b"DICM")
    return folder


def test_a_folder_of_instances_is_one_slide_however_it_is_named(tmp_path):
    cohort = tmp_path / "cohort"
    s1 = _fake_dicom_folder(cohort / "S1")
    s2 = _fake_dicom_folder(cohort / "1.2.840.99.2")  # folders named by their UID: no extension is stripped
    (cohort / "a.svs").write_bytes(b"x")
    (cohort / "notes").mkdir()  # a folder without .dcm files is not a slide
    (cohort / "notes" / "readme.txt").write_text("not a slide")

    def named(specs):
        return [(i.slide_id, i.path, i.error, i.duplicate_of) for i in expand_slide_inputs([str(s) for s in specs])]

    assert named([s1]) == [("S1", str(s1), None, None)]
    assert named([s1 / "1.2.3.0.dcm"]) == [("S1", str(s1), None, None)], "one instance names its folder"
    assert named([s1 / "*.dcm"]) == [("S1", str(s1), None, None)], "a glob of instances is one slide"
    assert named([cohort]) == [("1.2.840.99.2", str(s2), None, None), ("S1", str(s1), None, None),
                               ("a", str(cohort / "a.svs"), None, None)]
    assert named([cohort / "*"]) == named([cohort]) + [("notes", str(cohort / "notes"), None, None)]
    assert named([cohort / "*" / "*.dcm"]) == [("1.2.840.99.2", str(s2), None, None), ("S1", str(s1), None, None)]

    # stray instances beside other slides: the folder's instances are one slide, named after the folder
    mixed = _fake_dicom_folder(tmp_path / "mixed")
    (mixed / "b.tiff").write_bytes(b"x")
    assert named([mixed]) == [("mixed", str(mixed), None, None), ("b", str(mixed / "b.tiff"), None, None)]

    # a CSV may name the folder or one of its files; its slide_id is kept
    listing = tmp_path / "list.csv"
    listing.write_text("path,slide_id\ncohort/S1,case-1\ncohort/1.2.840.99.2/1.2.3.1.dcm,\n")
    assert named([listing]) == [("case-1", str(s1), None, None), ("1.2.840.99.2", str(s2), None, None)]

    # the same folder reached twice (the folder, then a glob of its files) is one slide and a repeat
    again = named([s1, s1 / "*.dcm"])
    assert again[0] == ("S1", str(s1), None, None) and again[1][3] == "S1" and len(again) == 2


def test_a_directory_without_instances_is_still_reported_as_a_directory(tmp_path):
    folder = tmp_path / "x.svs"
    folder.mkdir()
    with pytest.raises(SlideError) as err:
        open_slide(folder)
    assert err.value.kind == "directory" and "holds no .dcm files" in str(err.value)


def test_a_folder_of_dicom_files_that_are_no_slide_fails_clearly(tmp_path):
    folder = tmp_path / "ct"
    folder.mkdir()
    (folder / "a.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    (folder / "b.dcm").write_text("not dicom at all")
    with pytest.raises(SlideError) as err:
        plan_slide(folder, SlideOptions())
    assert err.value.kind == "not_a_slide", str(err.value)
    assert str(folder) in str(err.value) and "2 .dcm file(s)" in str(err.value)


def test_two_slides_in_one_folder_fail_instead_of_one_being_dropped(dicom_slide, dicom_jpeg_slide, tmp_path):
    both = _copy(dicom_slide, tmp_path / "both")
    for path in dicom_jpeg_slide.glob("*.dcm"):
        shutil.copy(path, both / path.name)
    with pytest.raises(SlideError) as err:
        plan_slide(both, SlideOptions())
    assert err.value.kind == "ambiguous"
    assert str(both) in str(err.value) and "more than one DICOM slide" in str(err.value)
    with open_slide(both) as slide:  # unverified opens (readers of a planned slide) stay cheap
        assert slide.dimensions == (2220, 2967)


def test_other_dicom_objects_beside_the_slide_are_ignored(dicom_slide, real_slide, tmp_path):
    folder = _copy(dicom_slide, tmp_path / "with-extras")
    (folder / "annotations.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    plan = plan_slide(folder, SlideOptions())
    assert plan.tile_count == plan_slide(real_slide, SlideOptions()).tile_count


def test_a_truncated_instance_is_an_error_naming_the_slide(dicom_slide, tmp_path):
    folder = _copy(dicom_slide, tmp_path / "truncated")
    level0 = max(folder.glob("*.dcm"), key=lambda p: p.stat().st_size)
    os.truncate(level0, level0.stat().st_size // 2)
    with pytest.raises(SlideError) as err:
        plan_slide(folder, SlideOptions())
    assert err.value.kind in ("unreadable", "unopenable") and str(folder) in str(err.value)


def test_the_grid_viewer_reads_a_dicom_thumbnail(dicom_slide):
    from nic.grids.show import slide_thumbnail

    found = slide_thumbnail(str(dicom_slide), 256)
    assert found is not None
    thumb, size = found
    assert size == (2220, 2967) and max(thumb.shape[:2]) == 256


def test_a_dicom_slide_in_a_bucket_is_one_slide_fetched_whole(dicom_slide, s3_bucket):
    """On an object store the prefix of a DICOM slide is one slide, listed without downloading;
    opening it fetches the whole prefix into the mirror."""
    import pyarrow.fs as pafs

    from nic.storage import display, to_local

    fs, _ = pafs.FileSystem.from_uri(s3_bucket)
    bucket = s3_bucket.removeprefix("s3://")
    for path in dicom_slide.glob("*.dcm"):
        with fs.open_output_stream(f"{bucket}/cohort/S1/{path.name}") as out:
            out.write(path.read_bytes())
    with fs.open_output_stream(f"{bucket}/cohort/other.svs") as out:
        out.write(b"II*\x00")
    items = expand_slide_inputs([to_local(f"{s3_bucket}/cohort")])
    assert [(i.slide_id, display(i.path)) for i in items] == [("S1", f"{s3_bucket}/cohort/S1"),
                                                              ("other", f"{s3_bucket}/cohort/other.svs")]
    assert not Path(items[0].path).exists(), "listing downloads nothing"
    one = next(dicom_slide.glob("*.dcm")).name
    assert [(i.slide_id, display(i.path)) for i in expand_slide_inputs([to_local(f"{s3_bucket}/cohort/S1/{one}")])] \
        == [("S1", f"{s3_bucket}/cohort/S1")]
    with open_slide(items[0].path) as slide:
        assert slide.dimensions == (2220, 2967)
        assert resolve_resolution(slide, SlideOptions()).base_mpp == pytest.approx(0.499)


# --- end to end on Ray: `nic tile` and `nic compress` ----------------------------------------------


def _manifest(out: Path) -> dict[str, dict]:
    rows = pq.read_table(out / "slides.parquet").to_pylist()
    assert len(rows) == len({r["slide_id"] for r in rows}), "every input exactly once"
    return {r["slide_id"]: r for r in rows}


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_nic_tile_reads_the_dicom_folder_as_the_svs(dicom_root, tmp_path):
    from nic.cli.main import main

    out = tmp_path / "tiles"
    # the cohort folder (an SVS and a DICOM folder) plus a glob naming the DICOM instances again
    assert main(["tile", "--slides", str(dicom_root), str(dicom_root / "small_HE_dicom" / "*.dcm"),
                 "--out", str(out), "--thumbnail-px", "256"]) == 0
    rows = _manifest(out)
    assert set(rows) == {"small_HE", "small_HE_dicom", "small_HE_dicom@2"}, "the DICOM folder is one slide"
    svs, dcm = rows["small_HE"], rows["small_HE_dicom"]
    assert svs["status"] == dcm["status"] == "ok", (svs["reason"], dcm["reason"])
    assert dcm["path"] == str(dicom_root / "small_HE_dicom")
    assert rows["small_HE_dicom@2"]["status"] == "skipped" and rows["small_HE_dicom@2"]["error_kind"] == "duplicate"
    for key in ("mpp", "base_mpp", "mpp_source", "level", "rows", "cols", "tiles"):
        assert dcm[key] == svs[key], key
    assert dcm["base_mpp"] == pytest.approx(0.499) and (dcm["rows"], dcm["cols"]) == (23, 17)
    a = pq.read_table(out / "tiles" / "small_HE.parquet").drop(["slide_id"])
    b = pq.read_table(out / "tiles" / "small_HE_dicom.parquet").drop(["slide_id"])
    assert a.equals(b), "the same tiles at the same places with the same tissue fractions"
    assert (out / "thumbnails" / "small_HE_dicom.png").exists()
    assert sorted(p.name for p in (out / "tiles").iterdir()) == ["small_HE.parquet", "small_HE_dicom.parquet"]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_nic_compress_gives_the_dicom_folders_the_svs_grid(dicom_root, dicom_jpeg_slide, tmp_path):
    from nic.cli.main import main
    from nic.grids import load_grid

    out = tmp_path / "grids"
    assert main(["compress", "--slides", str(dicom_root), str(dicom_jpeg_slide), "--encoder", "mean-rgb",
                 "--out", str(out), "--batch-size", "64"]) == 0
    rows = _manifest(out)
    assert set(rows) == {"small_HE", "small_HE_dicom", "small_HE_jpeg"}
    assert all(r["status"] == "ok" for r in rows.values()), {k: r["reason"] for k, r in rows.items()}
    svs, dcm, jpg = rows["small_HE"], rows["small_HE_dicom"], rows["small_HE_jpeg"]
    assert (dcm["rows"], dcm["cols"], dcm["tiles"]) == (svs["rows"], svs["cols"], svs["tiles"])
    assert (jpg["rows"], jpg["cols"]) == (svs["rows"], svs["cols"]) and abs(jpg["tiles"] - svs["tiles"]) <= 3

    grid, mask = load_grid(out, "small_HE")
    grid_d, mask_d = load_grid(out, "small_HE_dicom")
    np.testing.assert_array_equal(mask_d, mask)
    np.testing.assert_array_equal(grid_d, grid)  # lossless: the very same tiles, the very same features

    grid_j, mask_j = load_grid(out, "small_HE_jpeg")
    assert grid_j.shape == grid.shape
    assert (mask_j == mask).mean() > 0.99
    both = mask & mask_j
    # mean colours in [-1, 1]: within 2/127.5 (tile means moved < 2 levels; float16 storage)
    assert np.abs(grid_j[:, both] - grid[:, both]).max() < 2.0 / 127.5 + 2e-3
