"""Opening a slide file, with an error a person understands when it cannot be opened.

OpenSlide's own errors are terse ("Unsupported or missing image file") and say nothing about the
usual causes in a real collection: a missing path, a folder, an empty or truncated upload, a text
file with a slide's name. We check those first and sniff the file's first bytes, so the error
says what the file actually is.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import openslide
import tifffile

from nic.slides.errors import SlideError
from nic.storage import display, ensure_local

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


def check_slide_file(path: str | Path) -> Path:
    """Raise SlideError for a path that cannot be a slide file (missing, a folder, empty). A mirror
    path (nic.storage) is downloaded first, on the node that opens it."""
    path = Path(path)
    try:
        ensure_local(path)
    except FileNotFoundError:
        raise SlideError.about(display(path), "no such object in the object store", "missing") from None
    except OSError as exc:
        raise SlideError.about(display(path), f"cannot be downloaded ({exc})", "unopenable") from exc
    if not path.exists():
        raise SlideError.about(path, "no such file", "missing")
    if path.is_dir():
        # A directory named *.svs is a real thing (unpacked uploads); say so plainly.
        raise SlideError.about(path, "is a directory, not a slide file", "directory")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise SlideError.about(path, f"cannot be read ({exc.strerror or exc})", "unopenable") from exc
    if size == 0:
        raise SlideError.about(path, "file is empty (0 bytes)", "empty")
    return path


def open_slide(path: str | Path) -> openslide.OpenSlide:
    """Open a whole-slide image with OpenSlide or raise SlideError naming the file and the problem."""
    path = check_slide_file(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(512)
    except OSError as exc:
        raise SlideError.about(path, f"cannot be read ({exc.strerror or exc})", "unopenable") from exc
    try:
        return openslide.OpenSlide(os.fspath(path))
    except openslide.OpenSlideUnsupportedFormatError as exc:
        what = describe_file_start(head)
        if head.startswith(_TIFF_MAGICS):
            damage = tiff_damage(path)
            if damage:
                raise SlideError.about(path, f"OpenSlide cannot open it ({damage})", "unopenable") from exc
            raise SlideError.about(path, f"OpenSlide cannot open it ({what}: {exc})", "unopenable") from exc
        raise SlideError.about(path, f"not a slide ({what})", "not_a_slide") from exc
    except openslide.OpenSlideError as exc:
        raise SlideError.about(path, f"OpenSlide cannot open it ({exc})", "unopenable") from exc
    except OSError as exc:
        raise SlideError.about(path, f"cannot be read ({exc.strerror or exc})", "unopenable") from exc


def slide_vendor(slide: openslide.OpenSlide) -> str:
    """OpenSlide's format name ("aperio", "generic-tiff", ...), or "unknown"."""
    return slide.properties.get(openslide.PROPERTY_NAME_VENDOR) or "unknown"
