"""Encoder architectures, the inference path, and the encoder/ artifact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nic.encoders import (
    ENCODER_JSON,
    EncoderInfo,
    ReferenceTrunk,
    build_encoder,
    count_parameters,
    load_encoder,
    load_patch_encoder,
    optimise_for_inference,
    read_info,
    save_encoder,
)
from nic.encoders.artifact import builtin_encoder


def _perturb_batchnorm(module: nn.Module, seed: int = 0) -> None:
    """Give BatchNorm layers non-trivial statistics and affine parameters, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)


def _tiles(n: int = 4, px: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, px, px), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_reference_trunk_matches_the_paper() -> None:
    trunk = ReferenceTrunk(embedding_dim=128, tile_px=128)
    # 4 x conv 3x3 (3->128, then 128->128) with bias, 4 BatchNorms (affine), dense 3*3*128 -> 128.
    expected = (3 * 9 * 128 + 128) + 3 * (128 * 9 * 128 + 128) + 4 * 2 * 128 + (3 * 3 * 128 * 128 + 128)
    assert count_parameters(trunk) == expected == 594_944  # "about 0.6 M parameters"
    assert trunk.features_dim == 3 * 3 * 128
    convs = [m for m in trunk.convs if isinstance(m, nn.Conv2d)]
    assert all(c.stride == (2, 2) and c.padding == (0, 0) and c.kernel_size == (3, 3) for c in convs)
    acts = [m for m in trunk.convs if isinstance(m, nn.LeakyReLU)]
    assert len(acts) == 4 and all(a.negative_slope == 0.2 for a in acts)
    # conv -> LeakyReLU -> BatchNorm, four times
    assert [type(m).__name__ for m in trunk.convs][:3] == ["Conv2d", "LeakyReLU", "BatchNorm2d"]


@pytest.mark.parametrize("architecture, dim", [("reference", 128), ("resnet", 32), ("mean-rgb", 3)])
def test_encoders_take_uint8_and_return_float32(architecture: str, dim: int) -> None:
    encoder = build_encoder(architecture, dim, 128, seed=0).eval()
    out = encoder(_tiles(3))
    assert out.shape == (3, dim) and out.dtype == torch.float32
    with pytest.raises(ValueError, match=r"expects tiles \(N, 3, 128, 128\)"):
        encoder(_tiles(2, px=96))


@pytest.mark.parametrize("architecture, dim", [("reference", 128), ("resnet", 16), ("mean-rgb", 3)])
def test_optimised_inference_computes_the_same_embeddings(architecture: str, dim: int) -> None:
    encoder = build_encoder(architecture, dim, 128, seed=1)
    _perturb_batchnorm(encoder)
    encoder.eval()
    x = _tiles(6, seed=2)
    fast = optimise_for_inference(encoder)
    expected = encoder(x)
    got = fast(x)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    # Mean RGB is the mean colour scaled to [-1, 1]
    if architecture == "mean-rgb":
        assert torch.allclose(got, x.float().mean(dim=(2, 3)) / 127.5 - 1, atol=1e-5)


def test_reference_encoder_pools_other_tile_sizes() -> None:
    encoder = build_encoder("reference", 8, tile_px=96, seed=0).eval()
    assert encoder(_tiles(2, px=96)).shape == (2, 8)
    fast = optimise_for_inference(encoder)
    assert torch.allclose(fast(_tiles(2, px=96)), encoder(_tiles(2, px=96)), atol=1e-5)


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float(((got - expected).norm(dim=1) / expected.norm(dim=1)).max())


def test_reference_encoder_folds_pooling_into_the_first_conv_exactly() -> None:
    """The reduced-precision path replaces pool 2x2 + conv 3x3/2 by one conv 6x6/4: run in
    float64 it must give the float32 embeddings to float32 accuracy (a wrong fold is off by O(1))."""
    encoder = build_encoder("reference", 32, 128, seed=3)
    _perturb_batchnorm(encoder, seed=3)
    fast = optimise_for_inference(encoder.eval())
    x = _tiles(5, seed=4)
    expected = fast(x)
    folded = optimise_for_inference(encoder).set_precision(torch.float64)
    assert folded._low["pooled"] and folded._low["convs"][0][0].shape[-1] == 6
    assert folded.precision == "float64"
    assert _relative_error(folded(x), expected) < 1e-5
    # tiles that are not a multiple of the pooled side keep the adaptive pooling
    odd = build_encoder("reference", 8, tile_px=96, seed=0).eval()
    odd_low = optimise_for_inference(odd).set_precision(torch.float64)
    assert not odd_low._low["pooled"]
    assert _relative_error(odd_low(_tiles(2, px=96)), optimise_for_inference(odd)(_tiles(2, px=96))) < 1e-5


@pytest.mark.parametrize("architecture, dim", [("reference", 128), ("resnet", 16), ("mean-rgb", 3)])
def test_bfloat16_embeddings_stay_close_to_float32(architecture: str, dim: int) -> None:
    encoder = build_encoder(architecture, dim, 128, seed=5)
    _perturb_batchnorm(encoder, seed=5)
    x = _tiles(8, seed=6)
    exact = optimise_for_inference(encoder.eval())(x)
    low = optimise_for_inference(encoder).set_precision(torch.bfloat16)
    got = low.to("cpu")(x)  # moving the module keeps its cast weights in step
    assert got.dtype == torch.float32 and low.precision == "bfloat16"
    assert _relative_error(got, exact) < 2e-2
    back = low.set_precision(None)(x)
    assert back.dtype == torch.float32 and torch.equal(back, exact)


def test_seeded_construction_is_reproducible_and_leaves_global_state_alone() -> None:
    torch.manual_seed(123)
    before = torch.random.get_rng_state().clone()
    threads = torch.get_num_threads()
    a = build_encoder("reference", 16, seed=7)
    b = build_encoder("reference", 16, seed=7)
    c = build_encoder("reference", 16, seed=8)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.get_num_threads() == threads
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.trunk.fc.weight, c.trunk.fc.weight)


def test_eval_forward_runs_without_autograd() -> None:
    encoder = build_encoder("reference", 16, seed=0).eval()
    out = encoder(_tiles(2))
    assert not out.requires_grad and out.is_inference()
    module, _ = load_encoder("random")
    assert module(_tiles(2)).is_inference()


# ------------------------------------------------------------------------------------ artifact


def test_builtins_need_no_file_and_have_stable_hashes() -> None:
    rnd, info = load_encoder("random")
    rnd2, info2 = load_encoder("random")
    x = _tiles(3)
    assert info.embedding_dim == 128 and info.kind == "random" and info.tile_px == 128
    assert info.content_hash == info2.content_hash and len(info.content_hash) == 64
    assert torch.equal(rnd(x), rnd2(x))  # same seed, same weights
    mean, minfo = load_encoder("mean-rgb")
    assert minfo.embedding_dim == 3 and mean(x).shape == (3, 3)
    assert minfo.content_hash != info.content_hash
    assert json.loads(info.to_json())["name"] == "random"


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    encoder = build_encoder("reference", 32, seed=3)
    _perturb_batchnorm(encoder)
    info = EncoderInfo(name="mine", kind="mtl", architecture="reference", embedding_dim=32, tile_px=128,
                       content_hash="pending", tasks=[{"name": "t", "kind": "binary"}], metrics={"t/auc": 0.9})
    saved = save_encoder(encoder, tmp_path / "enc", info, extra_state={"heads": {"w": torch.ones(2)}})
    assert (tmp_path / "enc" / ENCODER_JSON).is_file() and (tmp_path / "enc" / "heads.pt").is_file()
    assert len(saved.content_hash) == 64 and saved.parameters == count_parameters(encoder)
    module, loaded = load_encoder(tmp_path / "enc")
    assert loaded.content_hash == saved.content_hash and loaded.metrics == {"t/auc": 0.9}
    x = _tiles(4)
    assert torch.allclose(module(x), encoder.eval()(x), atol=1e-4)
    # The json file itself works as the path too, and so does a plain string.
    assert load_encoder(str(tmp_path / "enc" / ENCODER_JSON))[1].name == "mine"
    assert read_info(tmp_path / "enc").tasks == [{"name": "t", "kind": "binary"}]
    plain, _ = load_encoder(tmp_path / "enc", optimise=False)
    assert torch.allclose(plain(x), encoder(x))
    # The same weights saved again give the same content hash (it identifies the weights).
    again = save_encoder(encoder, tmp_path / "enc2", info)
    assert again.content_hash == saved.content_hash


def test_corrupt_or_incomplete_artifacts_are_refused(tmp_path: Path) -> None:
    encoder = build_encoder("reference", 8, seed=0)
    info = EncoderInfo(name="e", kind="random", architecture="reference", embedding_dim=8, tile_px=128,
                       content_hash="pending")
    save_encoder(encoder, tmp_path / "enc", info)
    weights = tmp_path / "enc" / "encoder.pt"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ValueError, match="does not match encoder.json's content_hash"):
        load_encoder(tmp_path / "enc")
    (tmp_path / "half").mkdir()
    with pytest.raises(FileNotFoundError, match="no encoder.json"):
        load_encoder(tmp_path / "half")
    # encoder.json is removed first when an encoder is rewritten, so a crash mid-save leaves no marker.
    from nic.encoders.artifact import clear_marker

    clear_marker(tmp_path / "enc")
    assert not (tmp_path / "enc" / ENCODER_JSON).exists()


def test_weights_of_another_shape_are_refused(tmp_path: Path) -> None:
    save_encoder(build_encoder("reference", 8, seed=0), tmp_path / "enc",
                 EncoderInfo(name="e", kind="mtl", architecture="reference", embedding_dim=8, tile_px=128,
                             content_hash="x"))
    meta = json.loads((tmp_path / "enc" / ENCODER_JSON).read_text())
    meta["embedding_dim"] = 16
    (tmp_path / "enc" / ENCODER_JSON).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="weights do not fit a 'reference' encoder with C=16"):
        load_patch_encoder(tmp_path / "enc")


def test_builtin_random_matches_a_seeded_reference_trunk() -> None:
    encoder, info = builtin_encoder("random")
    same = build_encoder("reference", 128, 128, seed=info.seed)
    assert all(torch.equal(p, q) for p, q in zip(encoder.parameters(), same.parameters()))
    assert np.isclose(count_parameters(encoder), 594_944)


@pytest.mark.parametrize("architecture, pool", [("reference", "avgmax"), ("resnet", "avgmax"), ("resnet", "avg")])
def test_trunk_pool_variants_fuse_exactly_even_with_negative_batchnorm_scales(architecture: str, pool: str) -> None:
    """avgmax pools after the last BatchNorm; a max does not commute with a negative scale, so the
    fused path must apply that BatchNorm before pooling, not fold it into the dense layer."""
    encoder = build_encoder(architecture, 16, 128, seed=4, pool=pool)
    _perturb_batchnorm(encoder)
    with torch.no_grad():
        for m in encoder.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.mul_(torch.where(torch.arange(m.num_features) % 2 == 0, -1.0, 1.0))
    encoder.eval()
    assert encoder.pool == pool
    x = _tiles(5, seed=6)
    expected = encoder(x)
    assert torch.allclose(optimise_for_inference(encoder)(x), expected, atol=1e-4, rtol=1e-4)
    if architecture == "reference":
        fast = optimise_for_inference(encoder).set_precision(torch.bfloat16)
        got = fast(x).float()
        assert float((got - expected).norm() / expected.norm()) < 0.02


def test_avgmax_trunk_sees_one_small_dark_object_wherever_it_is() -> None:
    """The point of avgmax: a single small object moves the max-pooled half of the features the same
    way wherever it lies in the tile (a flatten trunk reads each position with its own weights)."""
    trunk = build_encoder("reference", 16, 128, seed=0, pool="avgmax").trunk.eval()
    base = torch.full((1, 3, 128, 128), 0.6)
    feats = []
    for y, x in ((20, 20), (20, 100), (100, 60)):
        img = base.clone()
        img[:, :, y : y + 10, x : x + 10] = -1.0
        feats.append(trunk.features(img)[0, 128:])  # the maxima
    assert torch.allclose(feats[0], feats[1], atol=0.05) and torch.allclose(feats[0], feats[2], atol=0.05)
    assert trunk.features_dim == 256


def test_trunk_pool_is_recorded_and_restored(tmp_path: Path) -> None:
    encoder = build_encoder("reference", 8, seed=5, pool="avgmax")
    info = EncoderInfo(name="p", kind="mtl", architecture="reference", embedding_dim=8, tile_px=128,
                       content_hash="pending")
    save_encoder(encoder, tmp_path / "enc", info)
    assert json.loads((tmp_path / "enc" / ENCODER_JSON).read_text())["trunk_pool"] == "avgmax"
    loaded, loaded_info = load_patch_encoder(tmp_path / "enc")
    assert loaded.pool == "avgmax" and loaded_info.trunk_pool == "avgmax"
    x = _tiles(2)
    assert torch.allclose(loaded(x), encoder.eval()(x), atol=1e-5)
    # an encoder.json written before trunk_pool existed means the architecture's own pooling
    old = json.loads((tmp_path / "enc" / ENCODER_JSON).read_text())
    del old["trunk_pool"]
    assert EncoderInfo.model_validate(old).trunk_pool is None
    assert build_encoder("reference", 8, pool=None).pool == "flatten" and build_encoder("resnet", 8).pool == "avg"


def test_trunk_pool_must_fit_the_architecture() -> None:
    from pydantic import ValidationError

    from nic.config.encoder import TrainEncoderConfig

    with pytest.raises(ValidationError, match="trunk_pool 'flatten' does not apply to the 'resnet' trunk"):
        TrainEncoderConfig(kind="random", architecture="resnet", trunk_pool="flatten")
    with pytest.raises(ValueError, match="pool 'avg' does not apply to the 'reference' trunk"):
        build_encoder("reference", 8, pool="avg")
    assert TrainEncoderConfig(kind="random", trunk_pool="avgmax").trunk_pool == "avgmax"
