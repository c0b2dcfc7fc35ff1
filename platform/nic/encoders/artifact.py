"""The `encoder/` artifact: weights (encoder.pt) and metadata (encoder.json, written last).

encoder.json is the completeness marker: it is removed before anything else is rewritten and
written only after the weights are in place, so a folder with an encoder.json always holds the
weights it describes (its content_hash is the sha256 of encoder.pt, checked on load).
`load_encoder` is what the compression stage calls inside its Ray actors; it is cheap and loads
to the CPU (or the given device) with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

import nic
from nic.artifacts import atomic_path, write_bytes_atomic, write_json_atomic
from nic.encoders.architectures import count_parameters
from nic.encoders.encoder import INPUT_NORMALISATION, PatchEncoder, build_encoder
from nic.encoders.inference import optimise_for_inference
from nic.storage import RAY_STORAGE_DIRS, display, ensure_local

if TYPE_CHECKING:
    from nic.encoders.external import EncoderSpec

ENCODER_JSON = "encoder.json"
ENCODER_WEIGHTS = "encoder.pt"
HEADS_WEIGHTS = "heads.pt"
WEIGHTS_FORMAT = "nic-encoder-v1"
BUILTIN_NAMES = ("mean-rgb", "random")
RANDOM_SEED = 0


class EncoderInfo(BaseModel):
    """What encoder.json says about an encoder; the compression stage records `content_hash`."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    name: str
    kind: str
    architecture: str
    trunk_pool: str | None = None  # how the trunk pools its last map; None: the architecture's own (older encoders)
    embedding_dim: int
    tile_px: int
    mpp: float = 0.5
    input: str = INPUT_NORMALISATION
    tasks: list[dict[str, Any]] = Field(default_factory=list)
    metrics: dict[str, float | None] = Field(default_factory=dict)
    content_hash: str
    weights: str | None = ENCODER_WEIGHTS
    parameters: int = 0
    seed: int | None = None
    config_hash: str | None = None
    epochs_trained: int | None = None
    created: str = Field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    nic_version: str = nic.__version__
    # Your own encoder (kind "external", nic.encoders.external): source, weights and their sha256,
    # normalisation, tile_px, mpp, C; recorded in every grid it makes. Never written to encoder.json.
    external: dict[str, Any] | None = Field(None, exclude=True)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def builtin_hash(name: str, architecture: str, embedding_dim: int, tile_px: int, seed: int | None) -> str:
    """A stable identity for a built-in encoder: its definition and seed, not a weights file."""
    definition = {"builtin": name, "architecture": architecture, "embedding_dim": embedding_dim,
                  "tile_px": tile_px, "seed": seed, "format": WEIGHTS_FORMAT}
    return hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()


def builtin_encoder(name: str, embedding_dim: int | None = None, tile_px: int = 128, mpp: float = 0.5,
                    seed: int = RANDOM_SEED) -> tuple[PatchEncoder, EncoderInfo]:
    """`mean-rgb` (C = 3) or `random` (the reference trunk, untrained, seeded; C = 128 by default)."""
    if name == "mean-rgb":
        architecture, dim, used_seed = "mean-rgb", 3, None
    elif name == "random":
        architecture, dim, used_seed = "reference", embedding_dim or 128, seed
    else:
        raise ValueError(f"unknown built-in encoder '{name}'; built-ins: {', '.join(BUILTIN_NAMES)}")
    encoder = build_encoder(architecture, dim, tile_px, seed=used_seed).eval()
    info = EncoderInfo(
        name=name, kind=name, architecture=architecture, embedding_dim=dim, tile_px=tile_px, mpp=mpp,
        content_hash=builtin_hash(name, architecture, dim, tile_px, used_seed), weights=None,
        parameters=count_parameters(encoder), seed=used_seed,
    )
    return encoder, info


def clear_marker(out: str | Path) -> None:
    """Remove encoder.json first, so a folder being rewritten never looks complete."""
    marker = Path(out) / ENCODER_JSON
    if marker.exists():
        marker.unlink()


def save_encoder(
    encoder: PatchEncoder,
    out: str | Path,
    info: EncoderInfo,
    extra_state: dict | None = None,
    extra_files: dict[str, Any] | None = None,
) -> EncoderInfo:
    """Write encoder.pt (state dict), optional heads.pt and JSON files, then encoder.json last.

    `info.content_hash` is replaced by the sha256 of the written encoder.pt; `info.weights` is
    None for encoders without parameters (mean-rgb), whose hash stays the built-in hash.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clear_marker(out)
    info = info.model_copy(update={"trunk_pool": encoder.pool})
    if count_parameters(encoder) > 0 or any(True for _ in encoder.buffers()):
        payload = {"format": WEIGHTS_FORMAT, "architecture": encoder.architecture,
                   "embedding_dim": encoder.embedding_dim, "tile_px": encoder.tile_px,
                   "state_dict": {k: v.detach().cpu() for k, v in encoder.state_dict().items()}}
        # Serialised in memory: torch.save names the archive after the file it writes to, so saving
        # to a temporary name would make the bytes (and content_hash) differ for the same weights.
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        write_bytes_atomic(out / ENCODER_WEIGHTS, buffer.getvalue())
        info.content_hash = hashlib.sha256(buffer.getvalue()).hexdigest()
        info.weights = ENCODER_WEIGHTS
    else:
        info.weights = None
    info.parameters = count_parameters(encoder)
    if extra_state:  # in memory first, like the weights: torch reports a full disk only as "write failed"
        buffer = io.BytesIO()
        torch.save(extra_state, buffer)
        write_bytes_atomic(out / HEADS_WEIGHTS, buffer.getvalue())
    for name, obj in (extra_files or {}).items():
        write_json_atomic(out / name, obj)
    with atomic_path(out / ENCODER_JSON) as tmp:
        tmp.write_text(info.to_json() + "\n")
    return info


def read_info(path: str | Path) -> EncoderInfo:
    """encoder.json of an encoder folder (or the file itself)."""
    path = Path(path)
    marker = path if path.suffix == ".json" else path / ENCODER_JSON
    # An encoder on an object store: fetch the folder (not its training checkpoints) on this node.
    ensure_local(marker.parent, missing_ok=True, exclude=RAY_STORAGE_DIRS)
    if not marker.is_file():
        raise FileNotFoundError(
            f"{display(marker)}: no encoder.json (a missing or incomplete encoder folder; "
            f"built-in encoders need no file: {', '.join(BUILTIN_NAMES)}; your own encoder needs an encoder.yaml, "
            "see docs/encoders.md)"
        )
    try:  # only the file's text and its validation: what is wrong here is the file
        return EncoderInfo.model_validate_json(marker.read_text())
    except (ValidationError, UnicodeDecodeError) as exc:  # not JSON or not an encoder.json; not text
        raise ValueError(f"{marker}: not a valid encoder.json ({exc})") from None


def load_patch_encoder(path: str | Path, verify: bool = True) -> tuple[PatchEncoder, EncoderInfo]:
    """The trainable PatchEncoder (eval mode) and its info, from an encoder folder."""
    info = read_info(path)
    folder = Path(path) if Path(path).suffix != ".json" else Path(path).parent
    if info.weights is None:
        encoder = build_encoder(info.architecture, info.embedding_dim, info.tile_px, seed=info.seed, pool=info.trunk_pool)
        return encoder.eval(), info
    weights = folder / info.weights
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: weights named in {folder / ENCODER_JSON} are missing")
    if verify:
        actual = sha256_file(weights)
        if actual != info.content_hash:
            raise ValueError(f"{weights}: sha256 {actual[:12]}... does not match encoder.json's content_hash "
                             f"{info.content_hash[:12]}... (corrupt or replaced weights)")
    payload = torch.load(weights, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"{weights}: not a nic encoder weights file (format {WEIGHTS_FORMAT})")
    encoder = build_encoder(info.architecture, info.embedding_dim, info.tile_px, pool=info.trunk_pool)
    try:
        encoder.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise ValueError(f"{weights}: weights do not fit a '{info.architecture}' encoder with C="
                         f"{info.embedding_dim} (trunk_pool {encoder.pool}): {exc}") from None
    return encoder.eval(), info


def load_encoder(
    path_or_name: str | Path | EncoderSpec, device: torch.device | str | None = None, optimise: bool = True,
    overrides: dict[str, Any] | None = None,
) -> tuple[nn.Module, EncoderInfo]:
    """A ready encoder module (eval mode, on `device`, default CPU) and its EncoderInfo.

    `path_or_name` is an `encoder/` folder, its encoder.json, or a built-in name (mean-rgb,
    random); or your own encoder (nic.encoders.external): an encoder.yaml or a folder holding one,
    a TorchScript file, `package.module:factory`, `timm:<architecture>`, or an EncoderSpec, with
    `overrides` (weights, tile_px, mpp, mean, std, embedding_dim) filling in or replacing its spec.
    The module's forward takes uint8 (N, 3, P, P) RGB tiles and returns float32 (N, C);
    it normalises its input itself and runs under inference_mode. With `optimise` (the default)
    BatchNorms and the input scaling are folded into the convolutions (same outputs, faster).
    """
    from nic.encoders.external import EncoderSpec, load_external, resolve_encoder

    spec = resolve_encoder(path_or_name, overrides)
    if spec is not None:
        return load_external(spec, device)
    assert not isinstance(path_or_name, EncoderSpec)  # a spec always resolves to itself
    if isinstance(path_or_name, str) and path_or_name in BUILTIN_NAMES:
        encoder, info = builtin_encoder(path_or_name)
    else:
        encoder, info = load_patch_encoder(path_or_name)
    module: nn.Module = optimise_for_inference(encoder) if optimise else encoder.eval()
    if device is not None:
        module = module.to(device)
    return module, info
