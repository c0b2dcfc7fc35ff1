"""The one exception for slides that cannot be used.

A slide collection always holds some bad files; stages record them per slide in their manifest
instead of crashing. So the message must make sense to the person who owns the files (it names
the file and says what is wrong in plain words), and `kind` gives code and manifests a short,
stable label to count and filter by.
"""

from __future__ import annotations

from pathlib import Path

from nic.storage import display

#: Every `SlideError.kind`, with what it means.
KINDS: dict[str, str] = {
    "missing": "the path does not exist",
    "directory": "the path is a directory, not a slide file nor a DICOM slide's folder of .dcm files",
    "empty": "the file has 0 bytes",
    "not_a_slide": "the file is not a slide format OpenSlide knows (text, plain image, ...)",
    "unopenable": "OpenSlide recognises the format but cannot open the file",
    "ambiguous": "a DICOM slide's folder holds instances of more than one slide (series)",
    "no_mpp": "no usable resolution (um/px) metadata and no slide.assume_mpp",
    "bad_mpp": "the resolution metadata is implausible (<= 0 or above slide.max_plausible_mpp)",
    "too_small": "the slide holds no whole tile at the working resolution",
    "unreadable": "the slide opens but its pixels cannot be decoded",
    "no_tissue": "tissue detection found no tile with enough tissue (raised by callers, not by plan_slide)",
}


class SlideError(Exception):
    """A slide that cannot be used: `str(err)` is "<path>: <problem>"; `kind` is one of KINDS.

    One way to build one, `SlideError(path, problem, kind)`: the message always names the file the
    same way (a mirror path as the URI the user gave, nic.storage.display), and `path`, `problem`
    and `kind` are always there for code and manifests to use. `path` None (no file to name) gives
    the problem alone.
    """

    def __init__(self, path: str | Path | None, problem: str, kind: str):
        if kind not in KINDS:
            raise ValueError(f"unknown SlideError kind {kind!r}; expected one of {sorted(KINDS)}")
        shown = None if path is None else display(path)
        super().__init__(problem if shown is None else f"{shown}: {problem}")
        self.path: str | None = shown
        self.problem: str = str(problem)
        self.kind: str = kind

    def __reduce__(self) -> tuple[type[SlideError], tuple[str | None, str, str]]:
        # Ray ships exceptions between processes by pickling; keep every field.
        return (SlideError, (self.path, self.problem, self.kind))
