"""Bring your own encoder: a TorchScript file, a Python entry point or a timm architecture.

nic's own encoders live in an `encoder/` folder with an encoder.json. Any other patch encoder (a
pathology foundation model already on disk, say) is described by a small spec, `encoder.yaml`
(or JSON) beside its file, or by the `encoder_*` fields of `nic compress`:

    source: timm                      # torchscript | entrypoint | timm
    architecture: vit_large_patch16_224
    weights: pytorch_model.bin        # relative to this file
    kwargs: {init_values: 1.0e-5}     # passed to timm.create_model / the factory
    tile_px: 224                      # the tile the model takes (px)
    mpp: 0.5                          # the resolution it was trained at (um/px)
    mean: [0.485, 0.456, 0.406]       # input normalisation: RGB in [0, 1], then (x - mean) / std
    std: [0.229, 0.224, 0.225]
    embedding_dim: 1024               # optional: checked against a dry forward pass

`resolve_encoder(ref, overrides)` turns what the user named into an `EncoderSpec` (or None for
nic's own encoders); `load_external(spec)` builds the module and wraps it as an `ExternalEncoder`,
which compress calls exactly like nic's own: uint8 (N, 3, P, P) RGB in, float32 (N, C) out, in
eval mode and under inference_mode. Its `content_hash` covers the sha256 of the weights file (and
of the TorchScript file or the entry point's source), the normalisation, tile size and resolution,
so a changed weights file is a different encoder and its grids are redone.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import re
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator
from torch import nn

from nic.config.base import LOCAL_PATH_FIELD, NicModel, format_validation_error
from nic.encoders.inference import _InferenceBase

SOURCES = ("torchscript", "entrypoint", "timm")
SPEC_NAMES = ("encoder.yaml", "encoder.yml")
SPEC_SUFFIXES = (".yaml", ".yml", ".json")
EXTERNAL_KIND = "external"
EXTERNAL_FORMAT = "nic-external-v1"
TIMM_PREFIX = "timm:"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: `package.module:factory`
ENTRYPOINT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_.]*$")
#: Suffixes of files a user may name as an encoder; a missing one is "no such file", not "no encoder.json".
MODEL_SUFFIXES = (".pt", ".pth", ".ts", ".jit", ".torchscript", ".bin", ".safetensors", ".ckpt", *SPEC_SUFFIXES)
#: Fields of CompressConfig that override a spec (`--encoder-tile-px` ...), by spec field.
OVERRIDE_FIELDS = {"weights": "encoder_weights", "tile_px": "encoder_tile_px", "mpp": "encoder_mpp",
                   "mean": "encoder_mean", "std": "encoder_std", "embedding_dim": "encoder_embedding_dim"}
DRY_RUN_TILES = 2
#: The field that names the model, per source (a spec beside a model file may leave it to that file).
NEEDS = {"torchscript": "path", "entrypoint": "entrypoint", "timm": "architecture"}


class EncoderSpecError(ValueError):
    """A spec, weights file or module that cannot be used; the message names the file."""


class EncoderSpec(NicModel):
    """What nic needs to know about an encoder it did not train (encoder.yaml)."""

    source: Literal["torchscript", "entrypoint", "timm"] = Field(
        ..., description="torchscript: a file saved by torch.jit; entrypoint: `package.module:factory` returning "
        "an nn.Module; timm: a timm architecture name with a local weights file.")
    name: str | None = Field(None, description="Name recorded in the grids (default: from the file or model).")
    path: str | None = Field(None, description="torchscript: the TorchScript file.", json_schema_extra=LOCAL_PATH_FIELD)
    entrypoint: str | None = Field(None, description="entrypoint: `package.module:factory`.")
    architecture: str | None = Field(None, description="timm: the architecture name (timm.list_models()).")
    weights: str | None = Field(
        None, description="entrypoint/timm: a state dict (torch.save or .safetensors); required for timm. An entry "
        "point whose factory takes a `weights` argument gets the path instead.", json_schema_extra=LOCAL_PATH_FIELD)
    kwargs: dict[str, Any] = Field(default_factory=dict,
                                   description="Keyword arguments of the factory or of timm.create_model.")
    python_path: list[str] = Field(
        default_factory=list, description="entrypoint: folders put on sys.path before importing (relative to the "
        "spec); the spec's own folder is always searched.")
    tile_px: int | None = Field(None, ge=8, le=4096, description="Tile size the model takes (px).")
    mpp: float | None = Field(None, gt=0, le=100, description="Resolution the model was trained at (um/px).")
    mean: list[float] | None = Field(None, min_length=3, max_length=3,
                                     description="Input normalisation: RGB in [0, 1], then (x - mean) / std.")
    std: list[float] | None = Field(None, min_length=3, max_length=3, description="See mean.")
    embedding_dim: int | None = Field(None, ge=1, description="C, checked against a dry forward pass.")
    strict_weights: bool = Field(
        True, description="false: keys of the weights file that the model does not have are ignored (keys the "
        "model needs must still all be there).")

    _origin: str | None = PrivateAttr(None)  # the spec file (or the flag) this came from, for messages
    _spec_file: str | None = PrivateAttr(None)  # the spec file read, if any (recorded in the grids)

    @field_validator("std")
    @classmethod
    def _positive_std(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and any(v <= 0 for v in value):
            raise ValueError(f"std must be positive, got {value}")
        return value

    @field_validator("entrypoint")
    @classmethod
    def _entrypoint_form(cls, value: str | None) -> str | None:
        if value is not None and not ENTRYPOINT.match(value):
            raise ValueError(f"entrypoint must look like 'package.module:factory', got {value!r}")
        return value

    @model_validator(mode="after")
    def _fields_of_source(self) -> EncoderSpec:
        needs = NEEDS[self.source]
        foreign = [f for f in ("path", "entrypoint", "architecture") if f != needs and getattr(self, f) is not None]
        if foreign:
            raise ValueError(f"source '{self.source}' takes '{needs}', not {', '.join(repr(f) for f in foreign)}")
        if self.source == "torchscript" and (self.weights is not None or self.kwargs or self.python_path):
            raise ValueError("a TorchScript file holds its own weights and code: drop weights, kwargs and python_path")
        if self.source == "timm" and self.kwargs.get("pretrained"):
            raise ValueError("kwargs.pretrained: nic never downloads weights; give a local weights file")
        return self

    @property
    def origin(self) -> str:
        return self._origin or "the encoder_* options"

    @property
    def target(self) -> str:
        """What the model is: the TorchScript file, the entry point or the architecture."""
        return str(self.path or self.entrypoint or self.architecture)

    def with_origin(self, origin: str | None, spec_file: str | None = None) -> EncoderSpec:
        self._origin = origin
        if spec_file is not None:
            self._spec_file = spec_file
        return self


# -- resolving what the user named ----------------------------------------------------------------


def resolve_encoder(ref: str | Path | EncoderSpec, overrides: dict[str, Any] | None = None) -> EncoderSpec | None:
    """The spec of a bring-your-own encoder named by `ref`, with `overrides` (spec field -> value,
    None values ignored) applied and every path absolute; None when `ref` is one of nic's own
    encoders (a built-in name, an `encoder/` folder or its encoder.json).

    `ref` may be: a spec file (`*.yaml`/`*.yml`, or a JSON with a `source` key); a folder with an
    encoder.yaml; a TorchScript file (described by a spec beside it, `<file>.yaml`, `<stem>.yaml`
    or encoder.yaml, or by overrides); `timm:<architecture>`; `package.module:factory`.
    """
    from nic.encoders.artifact import BUILTIN_NAMES, ENCODER_JSON

    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if isinstance(ref, EncoderSpec):
        return _apply(ref, overrides, None)
    text = str(ref)
    if text in BUILTIN_NAMES:
        _refuse_overrides(text, overrides)
        return None
    if text.startswith(TIMM_PREFIX):
        architecture = text[len(TIMM_PREFIX):].strip()
        if not architecture:
            raise EncoderSpecError(f"{text!r}: name a timm architecture, e.g. timm:vit_base_patch16_224")
        return _with_sidecar_of_weights(EncoderSpec(source="timm", architecture=architecture), overrides)
    path = _fetch(Path(text))
    if not path.exists() and ENTRYPOINT.match(text):
        # named on the command line: importable from the working folder too (and so from Ray workers)
        spec = EncoderSpec(source="entrypoint", entrypoint=text, python_path=[str(Path.cwd())])
        return _with_sidecar_of_weights(spec, overrides)
    if path.is_dir():
        if (path / ENCODER_JSON).is_file():
            _refuse_overrides(text, overrides)
            return None
        for name in SPEC_NAMES:
            if (path / name).is_file():
                return _apply(read_spec(path / name), overrides, None)
        _refuse_overrides(text, overrides)  # nic's loader says what is missing
        return None
    if not path.exists():
        if path.suffix.lower() in MODEL_SUFFIXES:
            raise FileNotFoundError(f"{text}: no such file")
        _refuse_overrides(text, overrides)
        return None
    if path.suffix.lower() in (".yaml", ".yml") or (path.suffix.lower() == ".json" and _is_spec_json(path)):
        return _apply(read_spec(path), overrides, None)
    if path.suffix.lower() == ".json":
        _refuse_overrides(text, overrides)  # an encoder.json of nic's own
        return None
    # A model file: its spec beside it, else a TorchScript file described by the overrides.
    sidecar = find_sidecar(path)
    if sidecar is None:
        spec = EncoderSpec(source="torchscript", path=str(path.absolute()))
        return _apply(spec.with_origin(f"{text} (no spec beside it: {', '.join(_sidecar_names(path))})"),
                      overrides, None)
    return _apply(read_spec(sidecar), overrides, path)


def _refuse_overrides(text: str, overrides: dict[str, Any]) -> None:
    if overrides:
        flags = ", ".join("--" + OVERRIDE_FIELDS.get(k, k).replace("_", "-") for k in sorted(overrides))
        raise EncoderSpecError(f"{flags} describe your own encoder, but {text!r} is one of nic's own encoders "
                               "(its encoder.json, or the built-in definition, says everything): drop them")
    return None


def _fetch(path: Path) -> Path:
    """A local copy of an encoder on an object store (its mirror path); local paths unchanged."""
    from nic.storage import RAY_STORAGE_DIRS, ensure_local, uri_for

    if uri_for(path) is None:
        return path
    return ensure_local(path, missing_ok=True, exclude=RAY_STORAGE_DIRS)


def _is_spec_json(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "source" in data and "content_hash" not in data


def _sidecar_names(path: Path) -> list[str]:
    names = [path.name + ".yaml"] + [path.stem + s for s in SPEC_SUFFIXES] + list(SPEC_NAMES)
    return list(dict.fromkeys(n for n in names if n != path.name))


def find_sidecar(path: Path) -> Path | None:
    """The spec beside a model or weights file: `<file>.yaml`, `<stem>.yaml|.yml|.json`, encoder.yaml."""
    for name in _sidecar_names(path):
        candidate = _fetch(path.parent / name)  # beside a model on an object store: fetched if it exists
        if candidate.is_file() and (candidate.suffix != ".json" or _is_spec_json(candidate)):
            return candidate
    return None


def _with_sidecar_of_weights(spec: EncoderSpec, overrides: dict[str, Any]) -> EncoderSpec:
    """`timm:<arch>` or an entry point given on the command line: a spec beside the weights file
    (if any) fills what the overrides leave open."""
    weights = overrides.get("weights")
    sidecar = find_sidecar(_fetch(Path(str(weights)))) if weights else None
    if sidecar is not None:
        base = read_spec(sidecar)
        if base.source != spec.source or base.target != spec.target:
            raise EncoderSpecError(f"{sidecar}: describes {base.source} {base.target!r}, but the encoder named is "
                                   f"{spec.source} {spec.target!r}")
        return _apply(base, overrides, None)
    return _apply(spec.with_origin(f"{spec.source} {spec.target!r} (flags)"), overrides, None)


def read_spec(path: str | Path) -> EncoderSpec:
    """An encoder.yaml (or JSON) with its relative paths made absolute; EncoderSpecError naming it."""
    import yaml

    path = _fetch(Path(path))
    try:
        text = path.read_text()
    except OSError as exc:
        raise EncoderSpecError(f"{path}: cannot read the encoder spec ({exc})") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise EncoderSpecError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from None
    if not isinstance(data, dict):
        raise EncoderSpecError(f"{path}: an encoder spec is a mapping of keys (source, tile_px, mpp, ...)")
    try:
        spec = EncoderSpec.model_validate(data)
    except ValidationError as exc:
        raise EncoderSpecError(format_validation_error(exc, EncoderSpec, f"encoder spec {path}")) from None
    base = path.absolute().parent
    updates: dict[str, Any] = {}
    for field in ("path", "weights"):
        value = getattr(spec, field)
        if value is not None:
            updates[field] = _absolute(value, base)
    if spec.source == "entrypoint":  # its module may sit beside the spec
        updates["python_path"] = [_absolute(p, base) for p in spec.python_path] + [str(base)]
    return spec.model_copy(update=updates).with_origin(str(path), str(path))


def _absolute(value: str, base: Path) -> str:
    from nic.storage import is_uri, to_local

    value = to_local(value) if is_uri(value) else os.path.expanduser(value)
    return str(Path(value) if Path(value).is_absolute() else (base / value).absolute())


def _apply(spec: EncoderSpec, overrides: dict[str, Any], model_file: Path | None) -> EncoderSpec:
    """`spec` with a model file it sits beside and the overrides filled in (paths absolute)."""
    origin = spec._origin
    updates: dict[str, Any] = {}
    if model_file is not None:  # the spec beside the file the user named: that file is the model or weights
        field = "path" if spec.source == "torchscript" else "weights"
        current = getattr(spec, field)
        if current is not None and Path(current).resolve() != model_file.resolve():
            raise EncoderSpecError(f"{origin}: names {field} {current}, but the encoder named is {model_file}")
        updates[field] = str(model_file.absolute())
    for key, value in overrides.items():
        if key not in OVERRIDE_FIELDS:
            raise EncoderSpecError(f"unknown encoder override {key!r}; known: {', '.join(OVERRIDE_FIELDS)}")
        updates[key] = _absolute(str(value), Path.cwd()) if key == "weights" else value
    data = {**spec.model_dump(), **updates}
    try:
        merged = EncoderSpec.model_validate(data)
    except ValidationError as exc:
        where = f"encoder spec {origin}" + (" with the encoder_* options" if overrides else "")
        raise EncoderSpecError(format_validation_error(exc, EncoderSpec, where)) from None
    if overrides:
        origin = f"{origin} with the encoder_* options" if origin else "the encoder_* options"
    needs = NEEDS[merged.source]
    if getattr(merged, needs) is None:
        raise EncoderSpecError(f"{origin}: source '{merged.source}' needs '{needs}'")
    return merged.with_origin(origin, spec._spec_file)


# -- identity -------------------------------------------------------------------------------------

_HASHES: dict[tuple[str, int, int], str] = {}
_HASH_LOCK = threading.Lock()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, computed once per process for a given (path, size, mtime)."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _HASH_LOCK:
        if key in _HASHES:
            return _HASHES[key]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    value = digest.hexdigest()
    with _HASH_LOCK:
        _HASHES[key] = value
    return value


# -- loading --------------------------------------------------------------------------------------


class ExternalEncoder(_InferenceBase):
    """A foreign module behind nic's encoder interface: uint8 (N, 3, P, P) RGB -> float32 (N, C).

    The input is scaled to [0, 1] and normalised with the spec's mean and std (one fused
    multiply-add), the module runs in eval mode under inference_mode (and autocast when
    `set_precision` asks for float16/bfloat16), and its output must be a (N, C) tensor."""

    scale: torch.Tensor  # buffers, registered in __init__
    shift: torch.Tensor

    def __init__(self, module: nn.Module, embedding_dim: int | None, tile_px: int, mean: list[float],
                 std: list[float], label: str):
        super().__init__(embedding_dim or 0, tile_px)
        self.module = module
        self.label = label
        std_t = torch.tensor(std, dtype=torch.float32)
        mean_t = torch.tensor(mean, dtype=torch.float32)
        self.register_buffer("scale", (1.0 / (255.0 * std_t)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", (-mean_t / std_t).view(1, 3, 1, 1), persistent=False)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        # NCHW-contiguous: a foreign model may .view() its input (the actors hand over channels-last)
        x = torch.addcmul(self.shift, x.float(), self.scale).contiguous()
        out = self.module(x)
        if not isinstance(out, torch.Tensor):
            raise EncoderSpecError(
                f"{self.label}: the model returned {type(out).__name__}, not a tensor; nic needs one (N, C) "
                "embedding per tile (wrap the model in an entry point factory that returns it)")
        expected = (x.shape[0], self.embedding_dim) if self.embedding_dim else None
        if out.ndim != 2 or out.shape[0] != x.shape[0] or (expected and tuple(out.shape) != expected):
            want = f"({x.shape[0]}, {self.embedding_dim})" if expected else f"({x.shape[0]}, C)"
            raise EncoderSpecError(
                f"{self.label}: the model returned shape {tuple(out.shape)} for {x.shape[0]} tiles, expected {want}: "
                "nic needs one C-vector per tile (pool or select the features in an entry point factory)")
        return out


def load_external(spec: EncoderSpec, device: torch.device | str | None = None):
    """(ExternalEncoder in eval mode on `device`, EncoderInfo) of a resolved spec."""
    from nic.encoders.architectures import count_parameters
    from nic.encoders.artifact import EncoderInfo

    where = spec.origin
    missing = [f for f in ("tile_px", "mpp") if getattr(spec, f) is None]
    if missing:
        flags = " and ".join("--" + OVERRIDE_FIELDS[f].replace("_", "-") for f in missing)
        raise EncoderSpecError(f"{where}: {' and '.join(missing)} not given: say which tile size and resolution "
                               f"the model takes in its spec (encoder.yaml) or with {flags}")
    assert spec.tile_px is not None and spec.mpp is not None  # for mypy: `missing` is empty
    module, weights, code_hash, default_norm = _build_module(spec)
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    mean = list(spec.mean) if spec.mean is not None else list(default_norm[0])
    std = list(spec.std) if spec.std is not None else list(default_norm[1])
    label = f"{where} ({spec.source} {spec.target})" if spec.target not in where else where
    encoder = ExternalEncoder(module, None, int(spec.tile_px), mean, std, label).eval()
    if device is not None:
        encoder = encoder.to(device)
    dim = _dry_run(encoder, spec, label)
    if spec.embedding_dim is not None and spec.embedding_dim != dim:
        raise EncoderSpecError(f"{label}: embedding_dim is {spec.embedding_dim} but the model returns {dim} "
                               "values per tile")
    encoder.embedding_dim = dim
    weights_hash = file_sha256(weights) if weights is not None else None
    identity = {
        "format": EXTERNAL_FORMAT, "source": spec.source,
        "model": Path(spec.target).name if spec.source == "torchscript" else spec.target,
        "kwargs": spec.kwargs, "weights_sha256": weights_hash, "code_sha256": code_hash,
        "tile_px": spec.tile_px, "mpp": spec.mpp, "mean": mean, "std": std, "embedding_dim": dim,
    }
    content_hash = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    from nic.storage import display

    record = {
        "source": spec.source, "name": spec.name or _default_name(spec),
        "model": display(spec.target) if spec.source == "torchscript" else spec.target,
        "weights": display(weights) if weights is not None else None, "weights_sha256": weights_hash,
        "code_sha256": code_hash, "kwargs": spec.kwargs, "tile_px": spec.tile_px, "mpp": spec.mpp,
        "mean": mean, "std": std, "embedding_dim": dim, "spec": display(spec._spec_file) if spec._spec_file else None,
        "content_hash": content_hash,
    }
    record = json.loads(json.dumps(record, default=str))  # plain JSON: it goes into every grid's metadata
    info = EncoderInfo(
        name=record["name"], kind=EXTERNAL_KIND, architecture=f"{spec.source}:{record['model']}",
        embedding_dim=dim, tile_px=int(spec.tile_px), mpp=float(spec.mpp),
        input=(f"uint8 RGB tiles (N, 3, P, P), scaled to [0, 1], then (x - mean) / std with mean {mean} "
               f"and std {std}"),
        content_hash=content_hash, weights=record["weights"], parameters=count_parameters(module),
        external=record,
    )
    return encoder, info


def _default_name(spec: EncoderSpec) -> str:
    if spec.source == "torchscript":
        return Path(spec.target).stem
    if spec.source == "timm":
        return spec.target
    return spec.target.rsplit(":", 1)[1]


def _dry_run(encoder: ExternalEncoder, spec: EncoderSpec, label: str) -> int:
    """C, from a forward pass over a few seeded random tiles (a wrong tile size or output fails here)."""
    device = next((b.device for b in encoder.buffers()), torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    assert spec.tile_px is not None  # load_external refuses a spec without one
    tiles = torch.randint(0, 256, (DRY_RUN_TILES, 3, spec.tile_px, spec.tile_px), generator=generator,
                          dtype=torch.uint8).to(device)
    try:
        out = encoder(tiles)
    except EncoderSpecError:
        raise
    except Exception as exc:
        detail = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        hint = f" (for a timm ViT at another size, pass kwargs: {{img_size: {spec.tile_px}}})" \
            if spec.source == "timm" else ""
        raise EncoderSpecError(f"{label}: a forward pass over {DRY_RUN_TILES} tiles of {spec.tile_px} x "
                               f"{spec.tile_px} px failed ({detail}): is tile_px {spec.tile_px} the size this "
                               f"model takes?{hint}") from None
    if not torch.isfinite(out).all():
        raise EncoderSpecError(f"{label}: the model returned non-finite values for random tiles")
    return int(out.shape[1])


def _build_module(spec: EncoderSpec) -> tuple[nn.Module, Path | None, str | None, tuple]:
    """(module, weights file or None, sha256 of the code or None, default (mean, std))."""
    imagenet = (IMAGENET_MEAN, IMAGENET_STD)
    if spec.source == "torchscript":
        path = _existing(spec.path, "TorchScript file", spec)
        try:
            with warnings.catch_warnings():  # torch >= 2.10 calls TorchScript deprecated; it loads all the same
                warnings.simplefilter("ignore", DeprecationWarning)
                module = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise EncoderSpecError(f"{path}: not a TorchScript file ({type(exc).__name__}: {exc}); save one with "
                                   "torch.jit.script(model).save(path) or torch.jit.trace(model, example).save(path), "
                                   "or name an entry point or a timm architecture instead") from None
        return module, path, None, imagenet
    if spec.source == "entrypoint":
        return _entrypoint_module(spec, imagenet)
    return _timm_module(spec)


def _existing(value: str | None, what: str, spec: EncoderSpec) -> Path:
    path = _fetch(Path(str(value)))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the {what} named by {spec.origin} does not exist"
                                + (" (it is a folder)" if path.is_dir() else ""))
    return path


def _entrypoint_module(spec: EncoderSpec, default_norm: tuple) -> tuple[nn.Module, Path | None, str | None, tuple]:
    module_name, factory_name = str(spec.entrypoint).split(":", 1)
    for folder in reversed(spec.python_path):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    try:
        py_module = importlib.import_module(module_name)
    except Exception as exc:
        raise EncoderSpecError(
            f"{spec.origin}: entry point {spec.entrypoint!r}: cannot import {module_name!r} "
            f"({type(exc).__name__}: {exc}); searched the spec's folder, python_path and sys.path (install the "
            "package on every node, or set python_path / PYTHONPATH)") from None
    factory: Any = py_module
    for part in factory_name.split("."):
        factory = getattr(factory, part, None)
    if not callable(factory):
        raise EncoderSpecError(f"{spec.origin}: entry point {spec.entrypoint!r}: {module_name} has no callable "
                               f"{factory_name!r}")
    weights = _existing(spec.weights, "weights file", spec) if spec.weights is not None else None
    kwargs = dict(spec.kwargs)
    takes_weights = _takes(factory, "weights")
    if weights is not None and takes_weights:
        kwargs["weights"] = str(weights)
    try:
        module = factory(**kwargs)
    except Exception as exc:
        raise EncoderSpecError(f"{spec.origin}: entry point {spec.entrypoint!r} failed ({type(exc).__name__}: "
                               f"{exc})") from None
    if not isinstance(module, nn.Module):
        raise EncoderSpecError(f"{spec.origin}: entry point {spec.entrypoint!r} returned {type(module).__name__}, "
                               "not a torch.nn.Module")
    if weights is not None and not takes_weights:
        _load_weights(module, weights, spec)
    source_file = inspect.getsourcefile(py_module) if hasattr(py_module, "__file__") else None
    code_hash = file_sha256(source_file) if source_file and Path(source_file).is_file() else None
    return module, weights, code_hash, default_norm


def _takes(factory: Any, name: str) -> bool:
    try:
        return name in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


def _timm_module(spec: EncoderSpec) -> tuple[nn.Module, Path | None, str | None, tuple]:
    try:
        import timm
    except Exception as exc:  # timm needs torchvision too, at import
        raise EncoderSpecError(f"{spec.origin}: timm architectures need the timm package, which cannot be imported "
                               f"here ({type(exc).__name__}: {exc}); pip install 'nic[timm]'") from None
    if spec.weights is None:
        raise EncoderSpecError(f"{spec.origin}: timm architecture {spec.architecture!r} needs a local weights file "
                               "(weights: in the spec, or --encoder-weights); nic never downloads weights")
    weights = _existing(spec.weights, "weights file", spec)
    if not timm.is_model(spec.target):  # the architecture (EncoderSpec: a timm spec names nothing else)
        close = timm.list_models(f"*{str(spec.architecture).split('.')[0][:12]}*")[:8]
        raise EncoderSpecError(f"{spec.origin}: timm has no architecture {spec.architecture!r}"
                               + (f" (similar: {', '.join(close)})" if close else "")
                               + f"; timm {timm.__version__}")
    kwargs = {"num_classes": 0, **spec.kwargs, "pretrained": False}
    try:
        module = timm.create_model(spec.target, **kwargs)
    except Exception as exc:
        raise EncoderSpecError(f"{spec.origin}: timm.create_model({spec.architecture!r}, {kwargs}) failed "
                               f"({type(exc).__name__}: {exc})") from None
    cfg = dict(getattr(module, "pretrained_cfg", None) or {})
    classifier = cfg.get("classifier")
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
    _load_weights(module, weights, spec, ignore_prefixes=tuple(f"{h}." for h in heads if h))
    mean = tuple(cfg.get("mean") or IMAGENET_MEAN)
    std = tuple(cfg.get("std") or IMAGENET_STD)
    return module, weights, None, (mean, std)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a torch.save file (a plain one, or nested under state_dict / model) or a
    .safetensors file; DataParallel's `module.` prefix is dropped."""
    state: Any  # whatever the file holds, checked below
    if path.suffix.lower() == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise EncoderSpecError(f"{path}: reading .safetensors needs the safetensors package "
                                   "(pip install safetensors)") from None
        try:
            state = load_file(str(path), device="cpu")
        except Exception as exc:
            raise EncoderSpecError(f"{path}: not a readable safetensors file ({exc})") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise EncoderSpecError(f"{path}: not a weights file torch.load can read with weights_only=True "
                                   f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict) \
                and not any(isinstance(v, torch.Tensor) for v in state.values()):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EncoderSpecError(f"{path}: not a state dict (a mapping of parameter names to tensors)")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _load_weights(module: nn.Module, path: Path, spec: EncoderSpec, ignore_prefixes: tuple[str, ...] = ()) -> None:
    state = read_state_dict(path)
    state = {k: v for k, v in state.items() if not k.startswith(ignore_prefixes)} if ignore_prefixes else state
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that do not fit
        raise EncoderSpecError(f"{path}: weights do not fit the model of {spec.origin} "
                               f"({spec.source} {spec.target}): {str(exc).strip()[:1500]}") from None
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing:
        raise EncoderSpecError(f"{path}: {len(missing)} parameter(s) of the model are not in the weights file, e.g. "
                               f"{', '.join(missing[:5])} (is it the weights of {spec.target}?)")
    if unexpected and spec.strict_weights:
        raise EncoderSpecError(f"{path}: {len(unexpected)} key(s) of the weights file are not in the model, e.g. "
                               f"{', '.join(unexpected[:5])} (set strict_weights: false in the spec to ignore them)")
