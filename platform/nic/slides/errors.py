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
    """A slide that cannot be used: `str(err)` names the file and the problem; `kind` is one of KINDS.

    Three ways to build one, all giving `path`, `problem`, `kind` attributes:
    - `SlideError(path, problem, kind)` or `SlideError.about(path, problem, kind)`: message "<path>: <problem>";
    - `SlideError(message, kind=...)` (or `SlideError(message, kind)`): a ready message that already names the file.
    """

    def __init__(self, *args: object, kind: str | None = None, path: str | Path | None = None,
                 problem: str | None = None):
        if len(args) == 3 and kind is None:
            path, problem, kind = args  # type: ignore[assignment]
            message = f"{path}: {problem}" if path is not None else str(problem)
        elif len(args) == 2 and kind is not None:
            path, problem = args  # type: ignore[assignment]
            message = f"{path}: {problem}" if path is not None else str(problem)
        elif len(args) == 2 and args[1] in KINDS:
            message, kind = str(args[0]), str(args[1])
        elif len(args) == 1 and kind is not None:
            message = str(args[0])
        else:
            raise TypeError(
                "SlideError(path, problem, kind) or SlideError(message, kind=...), got "
                f"{len(args)} positional argument(s) and kind={kind!r}"
            )
        if kind not in KINDS:
            raise ValueError(f"unknown SlideError kind {kind!r}; expected one of {sorted(KINDS)}")
        super().__init__(message)
        self.kind: str = kind
        self.path = str(path) if path is not None else None
        self.problem = str(problem) if problem is not None else message

    @classmethod
    def about(cls, path: str | Path | None, problem: str, kind: str) -> SlideError:
        """The error for `path`: message "<path>: <problem>" (the URI for a mirror path)."""
        return cls(None if path is None else display(path), problem, kind)

    def __reduce__(self):
        # Ray ships exceptions between processes by pickling; keep every field.
        return (_rebuild, (str(self), self.kind, self.path, self.problem))


def _rebuild(message: str, kind: str, path: str | None, problem: str | None) -> SlideError:
    return SlideError(message, kind=kind, path=path, problem=problem)
