"""Patch encoders: architectures, training objectives, and the `encoder/` artifact.

The compression stage needs only `load_encoder(path_or_name) -> (module, EncoderInfo)`.
"""

from nic.encoders.architectures import ARCHITECTURES, ReferenceTrunk, ResNetTrunk, count_parameters
from nic.encoders.artifact import (
    BUILTIN_NAMES,
    ENCODER_JSON,
    ENCODER_WEIGHTS,
    EncoderInfo,
    builtin_encoder,
    load_encoder,
    load_patch_encoder,
    read_info,
    save_encoder,
)
from nic.encoders.encoder import INPUT_NORMALISATION, PatchEncoder, build_encoder
from nic.encoders.inference import optimise_for_inference

__all__ = [
    "ARCHITECTURES",
    "BUILTIN_NAMES",
    "ENCODER_JSON",
    "ENCODER_WEIGHTS",
    "INPUT_NORMALISATION",
    "EncoderInfo",
    "PatchEncoder",
    "ReferenceTrunk",
    "ResNetTrunk",
    "build_encoder",
    "builtin_encoder",
    "count_parameters",
    "load_encoder",
    "load_patch_encoder",
    "optimise_for_inference",
    "read_info",
    "save_encoder",
]
