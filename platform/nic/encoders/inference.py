"""Inference-only encoders: the trained weights folded into the fewest, fastest operations.

The reference encoder on CPU is the compression bottleneck, so `optimise_for_inference` folds
everything affine into the convolutions: the input scaling (x / 127.5 - 1) into the first conv,
and each BatchNorm (which NIC places after the activation) into the *next* conv or the dense
layer. This is exact because the convs use valid padding (no zero padding that an affine map of
the input would change). With channels-last activations this roughly doubles CPU throughput
(benchmarks/results/encoders.md). The ResNet gets the usual conv+BN folding and channels-last.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from nic.encoders.architectures import BasicBlock, MeanRGB, ReferenceTrunk, ResNetTrunk, pool_features
from nic.encoders.encoder import PatchEncoder


class _InferenceBase(nn.Module, abc.ABC):
    """uint8 (N, 3, P, P) RGB -> float32 (N, C), always under inference_mode."""

    def __init__(self, embedding_dim: int, tile_px: int):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.tile_px = tile_px
        self.compute_dtype: torch.dtype | None = None  # None: float32

    def set_precision(self, dtype: torch.dtype | None) -> _InferenceBase:
        """Compute in `dtype` (float16/bfloat16; None = float32) from now on. The generic way is
        autocast around `_encode`; an encoder with a faster native path overrides this."""
        self.compute_dtype = dtype
        return self

    @property
    def precision(self) -> str:
        return "float32" if self.compute_dtype is None else str(self.compute_dtype).removeprefix("torch.")

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != self.tile_px or x.shape[3] != self.tile_px:
            raise ValueError(f"encoder expects tiles (N, 3, {self.tile_px}, {self.tile_px}), got {tuple(x.shape)}")
        if x.dtype != torch.uint8:
            raise TypeError(f"encoder expects uint8 tiles, got {x.dtype}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        with torch.inference_mode(), self._autocast(x.device.type):
            return self._encode(x).float()

    def _autocast(self, device_type: str):
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device_type, dtype=self.compute_dtype)

    @abc.abstractmethod
    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings of a checked uint8 batch; each fused encoder computes them its own way."""


class FusedReferenceEncoder(_InferenceBase):
    """The reference trunk with input scaling and BatchNorms folded into the convs and dense layer."""

    def __init__(self, trunk: ReferenceTrunk, embedding_dim: int, tile_px: int):
        super().__init__(embedding_dim, tile_px)
        convs = [m for m in trunk.convs if isinstance(m, nn.Conv2d)]
        bns = [m for m in trunk.convs if isinstance(m, nn.BatchNorm2d)]
        slopes = [m.negative_slope for m in trunk.convs if isinstance(m, nn.LeakyReLU)]
        self.slope = float(slopes[0])
        self.pooled_px = trunk.pooled_px
        dtype = convs[0].weight.dtype
        device = convs[0].weight.device
        # The affine map (per input channel) that precedes each conv: first the input scaling.
        scale = torch.full((3,), 1 / 127.5, dtype=dtype, device=device)
        shift = torch.full((3,), -1.0, dtype=dtype, device=device)
        weights, biases = [], []
        with torch.no_grad():
            for conv, bn in zip(convs, bns):
                w = conv.weight
                assert conv.bias is not None  # the reference trunk's convs have biases
                weights.append(w * scale[None, :, None, None])
                biases.append(conv.bias + (w * shift[None, :, None, None]).sum(dim=(1, 2, 3)))
                mean, var = bn.running_mean, bn.running_var
                assert mean is not None and var is not None  # the trunk's BatchNorms track running statistics
                s = bn.weight / torch.sqrt(var + bn.eps)
                scale, shift = s, bn.bias - mean * s
            self.pool_kind = trunk.pool_kind
            if self.pool_kind == "flatten":  # the last BatchNorm folds into the dense layer
                channels = convs[-1].out_channels
                side = int(round((trunk.features_dim / channels) ** 0.5))
                fc_w = trunk.fc.weight.view(-1, channels, side, side)
                fc_weight = (fc_w * scale[None, :, None, None]).reshape(fc_w.shape[0], -1)
                fc_bias = trunk.fc.bias + (fc_w * shift[None, :, None, None]).sum(dim=(1, 2, 3))
                last: tuple[torch.Tensor, torch.Tensor] | None = None  # folded into the dense layer
            else:  # a max does not commute with a negative BatchNorm scale: apply it before pooling
                fc_weight, fc_bias = trunk.fc.weight.clone(), trunk.fc.bias.clone()
                last = (scale, shift)
            self.fc_weight = nn.Parameter(fc_weight, requires_grad=False)
            self.fc_bias = nn.Parameter(fc_bias, requires_grad=False)
            self.last_scale = None if last is None else nn.Parameter(last[0].clone(), requires_grad=False)
            self.last_shift = None if last is None else nn.Parameter(last[1].clone(), requires_grad=False)
        self.weights = nn.ParameterList([nn.Parameter(w.contiguous(memory_format=torch.channels_last),
                                                      requires_grad=False) for w in weights])
        self.biases = nn.ParameterList([nn.Parameter(b, requires_grad=False) for b in biases])
        self._low: dict | None = None  # the cast weights of set_precision

    def set_precision(self, dtype: torch.dtype | None) -> FusedReferenceEncoder:
        """In float16/bfloat16 the weights are cast once (no autocast casting per batch) and, when
        the tile is an integer multiple f of the pooled side, the average pooling is folded into
        the first conv too: pooling f x f then a 3 x 3 stride-2 conv is exactly one 3f x 3f
        stride-2f conv whose taps are spread over f x f pixels and divided by f^2. The uint8 tile
        goes straight into that conv (0..255 are exact in both half types), which saves the
        float32 pooling pass that was a third of the time (1.6x the autocast throughput on an
        AMX Xeon: benchmarks/results/compress.md)."""
        self.compute_dtype = dtype
        self._low = None
        if dtype is None:
            return self
        factor = self.tile_px // self.pooled_px
        first = self.weights[0].detach()
        stride = 2
        if factor > 1 and self.tile_px % self.pooled_px == 0:
            first = first.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3) / factor ** 2
            stride = 2 * factor
        convs = [(first, stride)] + [(w.detach(), 2) for w in self.weights[1:]]
        self._low = {
            "convs": [(w.to(dtype).contiguous(memory_format=torch.channels_last), b.detach().to(dtype), st)
                      for (w, st), b in zip(convs, self.biases)],
            "pooled": stride > 2,
            "fc": (self.fc_weight.detach().to(dtype), self.fc_bias.detach().to(dtype)),
            "last": None if (last := self._last()) is None else (last[0].detach().to(dtype),
                                                                 last[1].detach().to(dtype)),
        }
        return self

    def _autocast(self, device_type: str):
        return contextlib.nullcontext()  # the low-precision path casts its own weights

    def _apply(self, fn, recurse: bool = True):
        # .to(device) must carry the cast copies along; rebuild them from the moved float32 weights.
        out = super()._apply(fn, recurse)
        if self._low is not None:
            self.set_precision(self.compute_dtype)
        return out

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        if self._low is not None:
            return self._encode_low(x, self._low)
        x = x.float()
        size = x.shape[-1]
        if size != self.pooled_px:
            x = F.avg_pool2d(x, size // self.pooled_px) if size % self.pooled_px == 0 else \
                F.adaptive_avg_pool2d(x, self.pooled_px)
        x = x.contiguous(memory_format=torch.channels_last)
        for w, b in zip(self.weights, self.biases):
            x = F.leaky_relu_(F.conv2d(x, w, b, stride=2), self.slope)
        return F.linear(self._pooled(x, self._last()), self.fc_weight, self.fc_bias)

    def _last(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The last BatchNorm's (scale, shift) to apply before pooling; None when folded (flatten)."""
        if self.last_scale is None or self.last_shift is None:  # both set, or neither
            return None
        return self.last_scale, self.last_shift

    def _pooled(self, x: torch.Tensor, last: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """The dense layer's input from the last conv map (its BatchNorm already folded for flatten)."""
        if last is not None:
            x = x * last[0][None, :, None, None] + last[1][None, :, None, None]
        return pool_features(x.contiguous(), self.pool_kind)

    def _encode_low(self, x: torch.Tensor, low: dict) -> torch.Tensor:
        x = x.to(self.compute_dtype)
        if not low["pooled"] and x.shape[-1] != self.pooled_px:
            x = F.adaptive_avg_pool2d(x.float(), self.pooled_px).to(self.compute_dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        for w, b, stride in low["convs"]:
            x = F.leaky_relu_(F.conv2d(x, w, b, stride=stride), self.slope)
        return F.linear(self._pooled(x, low["last"]), *low["fc"])


class FusedResNetEncoder(_InferenceBase):
    """The ResNet trunk with conv+BN pairs folded, run channels-last."""

    def __init__(self, trunk: ResNetTrunk, embedding_dim: int, tile_px: int):
        super().__init__(embedding_dim, tile_px)
        # Any: the copy's conv/BN pairs are swapped for fused convs and Identity, which the declared
        # layer types of ResNetTrunk cannot express (and torch's stubs lack Module.to(memory_format=)).
        fused: Any = copy.deepcopy(trunk).eval()
        fused.stem[0] = fuse_conv_bn_eval(fused.stem[0], fused.stem[1])
        fused.stem[1] = nn.Identity()
        for stage_block in fused.stages:
            assert isinstance(stage_block, BasicBlock)
            block: Any = stage_block  # its BatchNorms become Identity
            block.conv1, block.bn1 = fuse_conv_bn_eval(block.conv1, block.bn1), nn.Identity()
            block.conv2, block.bn2 = fuse_conv_bn_eval(block.conv2, block.bn2), nn.Identity()
            if isinstance(block.shortcut, nn.Sequential):
                shortcut: Any = block.shortcut  # (conv, BatchNorm)
                block.shortcut = fuse_conv_bn_eval(shortcut[0], shortcut[1])
        for p in fused.parameters():
            p.requires_grad_(False)
        self.trunk = fused.to(memory_format=torch.channels_last)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        x = PatchEncoder.normalise(x).contiguous(memory_format=torch.channels_last)
        return self.trunk(x)


class MeanRGBEncoder(_InferenceBase):
    """Mean colour of each tile, scaled to [-1, 1] like every other encoder's input."""

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mean(dim=(2, 3)).mul_(1 / 127.5).sub_(1.0)


@functools.cache
def cpu_has_native_bfloat16() -> bool:
    """True where this CPU computes bfloat16 matrix products in hardware (Intel AMX, AVX512-BF16).

    Elsewhere oneDNN emulates bfloat16 and it is slower than float32, so reduced precision on a
    CPU must be decided per machine (an actor on each node asks its own CPU)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:  # not Linux: no cheap, reliable check, so stay in float32
        return False
    return False


def reduced_precision(device_type: str, enabled: bool = True) -> torch.dtype | None:
    """The dtype an encoder computes in on `device_type` (`set_precision`), or None for float32.

    float16 on CUDA; bfloat16 on CPUs with native bfloat16 units (the reference encoder then runs
    1.9x faster on an AMX Xeon, embeddings within 0.4 % relative L2 of float32, cosine > 0.9999);
    float32 on other CPUs, where emulated bfloat16 would be slower."""
    if not enabled:
        return None
    if device_type == "cuda":
        return torch.float16
    if device_type == "cpu" and cpu_has_native_bfloat16():
        return torch.bfloat16
    return None


def optimise_for_inference(encoder: PatchEncoder) -> nn.Module:
    """An eval-only module computing exactly what `encoder.eval()` computes, faster."""
    encoder = encoder.eval()
    trunk = encoder.trunk
    if isinstance(trunk, ReferenceTrunk):
        module: nn.Module = FusedReferenceEncoder(trunk, encoder.embedding_dim, encoder.tile_px)
    elif isinstance(trunk, ResNetTrunk):
        module = FusedResNetEncoder(trunk, encoder.embedding_dim, encoder.tile_px)
    elif isinstance(trunk, MeanRGB):
        module = MeanRGBEncoder(encoder.embedding_dim, encoder.tile_px)
    else:
        raise TypeError(f"no inference path for trunk {type(trunk).__name__}")
    return module.eval()
