"""Turning what a user passes as `--slides` into one input per slide, losing nothing.

Users pass files, folders, glob patterns or CSV lists. Anything that cannot become a slide (a
missing path, a duplicate id) still becomes an input, carrying its error, so that it gets its own
row in the stage's manifest instead of disappearing.

Inputs that name the same file (symbolic or hard links, a path given twice, a file reached through
a folder and a glob) each get a row too. The slide id is the user's name for a slide (labels join
on it), so the rule follows the id:

- the same file under the same id again (a repeated path, a folder plus a glob, same-named links
  in two folders): one slide; the repeats are `duplicate_of` the first and become `skipped` rows
  (error_kind `duplicate`) whose reason names the row they repeat;
- the same file under another id (a link or a CSV row with another name): processed under its own
  id, and its row's reason says which slide it is the same file as (identical grids under two ids
  put one slide on both sides of a train/test split: the reason makes that visible);
- another file under an id already taken: failed, with the id clash as its reason.

A DICOM whole-slide image is not one file but a folder of instances (`.dcm` files: one per pyramid
level, maybe split further, plus label, overview and thumbnail). A folder that holds `.dcm` files is
one slide, whose id is the folder's name and whose path is the folder; its `.dcm` files never
become slides of their own, however they are named (the folder, a glob matching the files, one
file of it, a CSV row). So `--slides cohort/` with `cohort/a.svs` and `cohort/b/*.dcm` is two
slides, `a` and `b`. Folders are looked into one level deep, as for other slide files.
"""

from __future__ import annotations

import csv
import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path

from nic.storage import display, ensure_local, remote_children, remote_kind, uri_for

# Extensions OpenSlide reads (plus generic TIFF); folders are scanned for these.
SLIDE_EXTENSIONS = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm", ".czi",
)
LIST_EXTENSIONS = (".csv",)
#: A DICOM whole-slide image is the folder holding its instances, files with this extension.
DICOM_EXTENSION = ".dcm"


@dataclass(frozen=True)
class SlideInput:
    slide_id: str
    path: str
    error: str | None = None
    #: id of the earlier input that names the same file under the same id (this one is not processed)
    duplicate_of: str | None = None
    #: for a duplicate, why it is skipped; for the same file under another id, which slide it repeats
    note: str | None = None


def slide_id_for(path: str | Path) -> str:
    """A slide's id is its file name without the slide extension (ids must be safe folder names)."""
    name = Path(path).name
    lower = name.lower()
    for ext in sorted(SLIDE_EXTENSIONS, key=len, reverse=True):
        if lower.endswith(ext):
            name = name[: -len(ext)]
            break
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name) or "slide"


def _is_glob(spec: str) -> bool:
    return any(ch in spec for ch in "*?[")


def is_dicom_name(name: str) -> bool:
    return name.lower().endswith(DICOM_EXTENSION)


def holds_dicom(folder: str | Path) -> bool:
    """Whether a local folder holds DICOM instance files (`*.dcm`) directly: it is a DICOM slide."""
    try:
        with os.scandir(folder) as entries:
            return any(is_dicom_name(e.name) and not e.is_dir() for e in entries)
    except OSError:  # not a folder, or unreadable: not a DICOM slide
        return False


def _slide_path(path: Path) -> Path:
    """The path that stands for the slide a path names: a DICOM instance stands for its folder."""
    return path.parent if is_dicom_name(path.name) and not path.is_dir() else path


def _scan_folder(folder: Path) -> list[Path]:
    """Slides directly inside a folder: entries named like slides (including folders named x.svs,
    so that a broken entry is reported rather than skipped), except DICOM instances, which make the
    folder itself one DICOM slide (listed first), and sub-folders that are DICOM slides."""
    found = [folder] if holds_dicom(folder) else []
    for p in sorted(folder.iterdir()):
        name = p.name.lower()
        if is_dicom_name(name) and not p.is_dir():
            continue
        if name.endswith(SLIDE_EXTENSIONS) or (p.is_dir() and holds_dicom(p)):
            found.append(p)
    return found


def _unique(paths: list[Path]) -> list[Path]:
    """Paths in their order, each once (the DICOM instances of one folder are one slide)."""
    return list(dict.fromkeys(paths))


def _read_list(csv_path: Path) -> list[SlideInput]:
    try:
        with csv_path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or "path" not in reader.fieldnames:
                return [SlideInput(slide_id_for(csv_path), str(csv_path),
                                   f"{csv_path}: a slide list CSV needs a 'path' column "
                                   f"(found: {', '.join(reader.fieldnames or []) or 'no header'})")]
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        return [SlideInput(slide_id_for(csv_path), str(csv_path), f"{csv_path}: cannot read slide list: {exc}")]
    inputs = []
    for row in rows:
        raw = (row.get("path") or "").strip()
        if not raw:
            continue
        path = _slide_path(Path(raw) if os.path.isabs(raw) else csv_path.parent / raw)
        sid = (row.get("slide_id") or "").strip() or slide_id_for(path)
        inputs.append(SlideInput(sid, str(path)))
    return inputs


def expand_slide_inputs(specs: list[str]) -> list[SlideInput]:
    """One SlideInput per slide named by `specs`, in a stable order; duplicates and missing paths
    carry an error."""
    found: list[SlideInput] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if uri_for(path) is not None:
            found.extend(_remote_inputs(path))
        elif _is_glob(spec):
            matches = sorted(glob.glob(str(path)))
            if not matches:
                found.append(SlideInput(slide_id_for(spec), spec, f"{spec}: no file matches this pattern"))
            for match in _unique([_slide_path(Path(m)) for m in matches]):
                found.append(SlideInput(slide_id_for(match), str(match)))
        elif path.is_dir() and not path.name.lower().endswith(SLIDE_EXTENSIONS):
            entries = _scan_folder(path)
            if not entries:
                found.append(SlideInput(slide_id_for(path), str(path), f"{path}: folder holds no slide files "
                                        f"({', '.join(SLIDE_EXTENSIONS[:5])}, ..., or a DICOM slide's folder "
                                        "of .dcm files)"))
            found.extend(SlideInput(slide_id_for(p), str(p)) for p in entries)
        elif path.suffix.lower() in LIST_EXTENSIONS and path.is_file():
            found.extend(_read_list(path))
        elif not path.exists():
            found.append(SlideInput(slide_id_for(path), str(path), f"{path}: no such file"))
        else:
            path = _slide_path(path)
            found.append(SlideInput(slide_id_for(path), str(path)))
    return _dedupe(found)


def _remote_inputs(path: Path) -> list[SlideInput]:
    """The slides an object-store URI names (through its mirror path), listed without downloading."""
    uri = display(path)
    try:
        if _is_glob(uri):
            return [SlideInput(slide_id_for(path), str(path), f"{uri}: patterns are not supported in "
                               "object-store URIs; name the folder (prefix) or list the slides in a CSV")]
        kind = remote_kind(path)
        if kind == "dir":
            entries = _scan_remote_folder(path)
            if not entries:
                return [SlideInput(slide_id_for(path), str(path), f"{uri}: prefix holds no slide files")]
            return [SlideInput(slide_id_for(p), str(p)) for p in entries]
        if kind == "file" and path.suffix.lower() in LIST_EXTENSIONS:
            return _read_list(ensure_local(path))
        if kind == "file" and is_dicom_name(path.name):
            return [SlideInput(slide_id_for(path.parent), str(path.parent))]
        if kind == "file":
            return [SlideInput(slide_id_for(path), str(path))]
        return [SlideInput(slide_id_for(path), str(path), f"{uri}: no such object")]
    except OSError as exc:
        return [SlideInput(slide_id_for(path), str(path), f"{uri}: cannot list it ({exc})")]


def _scan_remote_folder(path: Path) -> list[Path]:
    """`_scan_folder` for a mirror path, from listings only: the prefix itself when it holds .dcm
    objects, objects named like slides, and sub-prefixes holding .dcm objects (one listing each
    for the children not named like slide files)."""
    children = remote_children(path) or []
    found = [path] if any(is_dicom_name(p.name) for p in children) else []
    for child in children:
        name = child.name.lower()
        if is_dicom_name(name):
            continue
        if name.endswith(SLIDE_EXTENSIONS) or _remote_holds_dicom(child):
            found.append(child)
    return found


def _remote_holds_dicom(path: Path) -> bool:
    try:
        return any(is_dicom_name(p.name) for p in remote_children(path) or [])
    except OSError:  # an object, not a prefix
        return False


def _file_key(path: str) -> tuple:
    """What identifies the file an input names: device and inode for a local file (so links and
    hard links to one file agree), else the resolved path (missing files, object-store URIs)."""
    if uri_for(path) is not None:
        return ("uri", display(path))
    try:
        st = os.stat(path)
    except OSError:
        return ("path", os.path.realpath(path))
    return ("file", st.st_dev, st.st_ino)


def _dedupe(inputs: list[SlideInput]) -> list[SlideInput]:
    """One input per name given, each with a unique slide id (the module docstring's rule): a
    repeat of a file under the same id is marked `duplicate_of`, a clash of ids between two files
    is an error, the same file under another id is noted."""
    first_for_id: dict[str, tuple[tuple, str]] = {}  # id -> (file key, path)
    first_for_file: dict[tuple, tuple[str, str]] = {}  # file key -> (id, path)
    out: list[SlideInput] = []
    for item in inputs:
        key = _file_key(item.path)
        taken = first_for_id.get(item.slide_id)
        if taken is not None and taken[0] == key:
            out.append(SlideInput(
                f"{item.slide_id}@{len(out)}", item.path, duplicate_of=item.slide_id,
                note=f"{item.path}: the same file as input {taken[1]} under the same slide id "
                     f"'{item.slide_id}' (listed twice); it is processed once, in that row"))
            continue
        if taken is not None:
            error = item.error or (f"{item.path}: slide id '{item.slide_id}' is already used by {taken[1]}; "
                                   "rename the file or give a slide_id column in a CSV list")
            out.append(SlideInput(f"{item.slide_id}@{len(out)}", item.path, error))
            continue
        first_for_id[item.slide_id] = (key, item.path)
        same = first_for_file.get(key) if item.error is None else None
        if same is not None:
            item = SlideInput(item.slide_id, item.path, note=(
                f"the same file as {same[1]} (slide '{same[0]}'), processed again under its own id"))
        else:
            first_for_file.setdefault(key, (item.slide_id, item.path))
        out.append(item)
    return out


def note_aliases(rows: dict[str, dict], inputs: list[SlideInput]) -> None:
    """Add each alias's note (the same file as another slide) to its manifest row's reason."""
    for item in inputs:
        row = rows.get(item.slide_id)
        if item.note and item.duplicate_of is None and row is not None and row.get("status") != "failed":
            reason = row.get("reason") or ""
            row["reason"] = f"{reason}; {item.note}" if reason else item.note
