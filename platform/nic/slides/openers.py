"""Opening a slide file, with an error a person understands when it cannot be opened.

OpenSlide's own errors are terse ("Unsupported or missing image file") and say nothing about the
usual causes in a real collection: a missing path, a folder, an empty or truncated upload, a text
file with a slide's name. We check those first and sniff the file's first bytes, so the error
says what the file actually is.

A DICOM whole-slide image is a folder of instances (`.dcm`, one per pyramid level plus label,
overview and thumbnail). OpenSlide opens it through any one instance and gathers the others of the
same series (SeriesInstanceUID) from that folder; files of other series are silently left out. So
`open_slide(folder)` opens the folder's largest instance (the base level, normally) and, with
`verify=True`, makes sure the folder holds one slide only: instances OpenSlide did not account for
are opened one by one, and one of another series fails the slide instead of being dropped.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import openslide
import tifffile

from nic.slides.errors import SlideError
from nic.storage import ensure_local

_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_IMAGE_MAGICS = {
    b"\x89PNG": "a plain PNG image",
    b"\xff\xd8\xff": "a plain JPEG image",
    b"GIF8": "a GIF image",
    b"BM": "a BMP image",
    b"%PDF": "a PDF document",
    b"PK\x03\x04": "a ZIP archive",
    b"\x1f\x8b": "a gzip archive",
}


def describe_file_start(head: bytes) -> str:
    """Say in words what a file that OpenSlide does not recognise looks like."""
    if head.startswith(_TIFF_MAGICS):
        return "a TIFF file that is not a whole-slide image OpenSlide supports"
    for magic, what in _IMAGE_MAGICS.items():
        if head.startswith(magic):
            return what
    if b"\x00" not in head:
        try:
            head.decode("utf-8")
            return "text file?"
        except UnicodeDecodeError:
            pass
    return "format not recognised"


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def tiff_damage(path: Path) -> str | None:
    """Why a TIFF-looking file is structurally broken (typically a truncated upload), or None.

    OpenSlide reports such files as an unsupported format, which sends people looking for a
    format problem instead of re-copying the file. tifffile logs (rather than raises) most broken
    offsets, so its warnings are collected while parsing.
    """
    size = path.stat().st_size
    logger = logging.getLogger("tifffile")
    collect = _Collect()
    propagate = logger.propagate
    logger.addHandler(collect)
    logger.propagate = False  # said once, in the SlideError, not in the job's log
    try:
        with tifffile.TiffFile(path) as tif:
            pages = list(tif.pages)
            for page in pages:
                ends = [o + c for o, c in zip(page.dataoffsets, page.databytecounts) if c]
                if ends and max(ends) > size:
                    return f"image data runs past the end of the file: truncated at {size} bytes"
    except Exception as exc:  # tifffile raises many types for broken structures
        return f"the TIFF structure is damaged ({exc})"
    finally:
        logger.removeHandler(collect)
        logger.propagate = propagate
    if not pages:
        return f"no readable image directory: the file is damaged or truncated ({size} bytes)"
    if collect.messages:
        detail = collect.messages[0].split("> ", 1)[-1]
        return f"the TIFF structure is damaged or the file is truncated at {size} bytes ({detail})"
    return None


def dicom_instances(folder: str | Path) -> list[Path]:
    """The DICOM instance files (`*.dcm`, any case) directly in a folder, largest first (the base
    level first: OpenSlide reads its metadata from the file it is given), then by name."""
    try:
        files = [p for p in Path(folder).iterdir() if p.name.lower().endswith(".dcm") and p.is_file()]
        return sorted(files, key=lambda p: (-p.stat().st_size, p.name))
    except OSError:
        return []


def check_slide_file(path: str | Path) -> Path:
    """Raise SlideError for a path that cannot be a slide (missing, a folder that is no DICOM slide,
    empty). A mirror path (nic.storage) is downloaded first, on the node that opens it (a DICOM
    slide's whole prefix)."""
    path = Path(path)
    try:
        ensure_local(path)
    except FileNotFoundError:
        raise SlideError(path, "no such object in the object store", "missing") from None
    except OSError as exc:
        raise SlideError(path, f"cannot be downloaded ({exc})", "unopenable") from exc
    if not path.exists():
        raise SlideError(path, "no such file", "missing")
    if path.is_dir():
        if dicom_instances(path):
            return path
        # A directory named *.svs is a real thing (unpacked uploads); say so plainly.
        raise SlideError(path, "is a directory, not a slide file (nor a DICOM slide: it holds no "
                               ".dcm files)", "directory")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise SlideError(path, f"cannot be read ({exc.strerror or exc})", "unopenable") from exc
    if size == 0:
        raise SlideError(path, "file is empty (0 bytes)", "empty")
    return path


def open_slide(path: str | Path, verify: bool = False) -> openslide.OpenSlide:
    """Open a whole-slide image (a file, or a DICOM slide's folder) with OpenSlide or raise
    SlideError naming the file and the problem. `verify` checks that a DICOM folder holds one
    slide only (it may open every instance: done once per slide, when it is planned)."""
    path = check_slide_file(path)
    if path.is_dir():
        return _open_dicom_folder(path, verify)
    try:
        with open(path, "rb") as fh:
            head = fh.read(512)
    except OSError as exc:
        raise SlideError(path, f"cannot be read ({exc.strerror or exc})", "unopenable") from exc
    try:
        return openslide.OpenSlide(os.fspath(path))
    except openslide.OpenSlideUnsupportedFormatError as exc:
        what = describe_file_start(head)
        if head.startswith(_TIFF_MAGICS):
            damage = tiff_damage(path)
            if damage:
                raise SlideError(path, f"OpenSlide cannot open it ({damage})", "unopenable") from exc
            raise SlideError(path, f"OpenSlide cannot open it ({what}: {exc})", "unopenable") from exc
        raise SlideError(path, f"not a slide ({what})", "not_a_slide") from exc
    except openslide.OpenSlideError as exc:
        raise SlideError(path, f"OpenSlide cannot open it ({exc})", "unopenable") from exc
    except OSError as exc:
        raise SlideError(path, f"cannot be read ({exc.strerror or exc})", "unopenable") from exc


def _try_open(path: Path) -> tuple[openslide.OpenSlide | None, str | None, bool]:
    """(slide, None, _) when OpenSlide opens `path`; else (None, why, whether OpenSlide did not
    recognise it at all, as for a DICOM file that is no whole-slide image)."""
    try:
        return openslide.OpenSlide(os.fspath(path)), None, False
    except openslide.OpenSlideUnsupportedFormatError as exc:
        return None, f"OpenSlide does not recognise it: {exc}", True
    except (openslide.OpenSlideError, OSError) as exc:
        return None, str(exc), False


def _open_dicom_folder(folder: Path, verify: bool) -> openslide.OpenSlide:
    """The DICOM slide in `folder`, opened through its largest instance OpenSlide opens."""
    files = dicom_instances(folder)
    refused: list[tuple[Path, str, bool]] = []  # (file, why, OpenSlide did not recognise it)
    for i, first in enumerate(files):
        if first.stat().st_size == 0:
            refused.append((first, "file is empty (0 bytes)", False))
            continue
        slide, problem, unknown = _try_open(first)
        if slide is None:
            refused.append((first, problem or "", unknown))
            continue
        if verify and len(files) > slide.level_count + len(slide.associated_images):
            try:
                _check_one_series(folder, slide, refused, files[i + 1:])
            except BaseException:
                slide.close()
                raise
        return slide
    where, why, _ = refused[0]
    raise SlideError(
        folder, f"a folder of {len(files)} .dcm file(s), none of which OpenSlide opens as a DICOM "
                f"whole-slide image ({where.name}: {why})",
        "not_a_slide" if all(unknown for _, _, unknown in refused) else "unopenable")


def _check_one_series(folder: Path, slide: openslide.OpenSlide, refused: list[tuple[Path, str, bool]],
                      rest: list[Path]) -> None:
    """SlideError when `folder` holds an instance of another slide (series) than `slide`'s, or one
    that OpenSlide recognises but cannot open (a truncated copy: the slide would silently lack it).
    Called only when the folder holds more instances than the slide's levels and associated images
    (several files per level, other DICOM objects, or another slide): each is then opened once."""
    series = slide.properties.get("dicom.SeriesInstanceUID")
    for path in rest:
        if path.stat().st_size == 0:
            refused.append((path, "file is empty (0 bytes)", False))
            continue
        other, problem, unknown = _try_open(path)
        if other is None:
            refused.append((path, problem or "", unknown))
            continue
        with other:
            theirs = other.properties.get("dicom.SeriesInstanceUID")
        if series and theirs and theirs != series:
            raise SlideError(
                folder, f"holds more than one DICOM slide (series {series} and, e.g. in {path.name}, "
                        f"{theirs}); put each slide's .dcm files in a folder of its own", "ambiguous")
    # Files OpenSlide does not recognise at all are other DICOM objects (annotations, reports) that
    # are no part of the slide; one it recognises but cannot open is a damaged instance of it.
    for path, problem, unknown in refused:
        if not unknown:
            raise SlideError(folder, f"its instance {path.name} cannot be opened ({problem}); "
                                           "the slide would be read without it", "unopenable")


def slide_vendor(slide: openslide.OpenSlide) -> str:
    """OpenSlide's format name ("aperio", "generic-tiff", ...), or "unknown"."""
    return slide.properties.get(openslide.PROPERTY_NAME_VENDOR) or "unknown"
