"""Bring your own encoder: TorchScript files, entry points and timm architectures behind nic's
encoder interface (uint8 tiles in, float32 (N, C) out), their specs, identity and errors, the grids
they make (C up to 2,048, float16), and `nic compress` with them on the real slide fixture.

The tests named `test_nic_compress_*` start Ray (the session's shared instance); the others do not.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from torch import nn

from nic.cli.main import build_parser, config_from_args, main
from nic.compress.actors import EncoderActor, plan_one
from nic.compress.collector import SlideCollector
from nic.config.base import ConfigError, load_config
from nic.config.compress import CompressConfig
from nic.config.pipeline import PipelineConfig
from nic.config.slides import SlideOptions
from nic.encoders import load_encoder
from nic.encoders.external import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EncoderSpec,
    EncoderSpecError,
    ExternalEncoder,
    resolve_encoder,
)
from nic.grids import load_grid, read_grid_meta, verify_grid_file
from nic.grids.schema import GridMeta, slide_file
from nic.grids.writer import grid_table, write_slide_grid
from nic.pipeline import plan_pipeline

TILE = 64  # the tiny test encoders take 64 px tiles (the timm one 224 px)
REPO = Path(__file__).resolve().parent.parent


class TinyEncoder(nn.Module):
    """A small conv net: (N, 3, P, P) normalised floats -> (N, width)."""

    def __init__(self, width: int = 24):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 5, stride=4)
        self.bn = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))


def tiny(width: int = 24, seed: int = 0) -> TinyEncoder:
    torch.manual_seed(seed)
    model = TinyEncoder(width)
    with torch.no_grad():  # BatchNorm statistics as after training, so eval mode matters
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def write_spec(file: Path, /, **fields) -> Path:
    file.write_text(yaml.safe_dump(fields))
    return file


def torchscript_encoder(folder: Path, width: int = 24, seed: int = 0, **spec) -> Path:
    """model.pt (scripted TinyEncoder) with model.yaml beside it; returns the model file."""
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / "model.pt"
    torch.jit.script(tiny(width, seed)).save(str(model))
    write_spec(folder / "model.yaml", **{"source": "torchscript", "tile_px": TILE, "mpp": 0.5, **spec})
    return model


FACTORY_SOURCE = textwrap.dedent('''
    import torch
    from torch import nn


    class Wide(nn.Module):
        """Pool the tile to 8 x 8, a 1 x 1 conv to `width` channels, average: (N, width)."""

        def __init__(self, width):
            super().__init__()
            self.proj = nn.Conv2d(3, width, 1)

        def forward(self, x):
            return self.proj(nn.functional.adaptive_avg_pool2d(x, 8)).mean(dim=(2, 3))


    def build(width=16):
        return Wide(width)


    def build_with_weights(weights, width=16):
        model = Wide(width)
        model.load_state_dict(torch.load(weights, weights_only=True))
        return model


    def not_a_module():
        return "a string"


    def feature_maps(width=16):
        return nn.Conv2d(3, width, 3)
''')


def entrypoint_encoder(folder: Path, width: int = 16, **spec) -> tuple[Path, str]:
    """A module with factories written to `folder` (a new module name each time, so no test sees
    another's cached import), weights saved from its `build`, and encoder.yaml naming it."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"byo_factory_{uuid.uuid4().hex[:8]}"
    (folder / f"{name}.py").write_text(FACTORY_SOURCE)
    torch.manual_seed(1)
    weights = folder / "weights.pth"
    proj = nn.Conv2d(3, width, 1)
    torch.save({"proj.weight": proj.weight.detach(), "proj.bias": proj.bias.detach()}, weights)
    fields = {"source": "entrypoint", "entrypoint": f"{name}:build", "weights": "weights.pth",
              "kwargs": {"width": width}, "tile_px": TILE, "mpp": 0.5, **spec}
    return write_spec(folder / "encoder.yaml", **fields), name


def tiles(n: int = 5, px: int = TILE, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, px, px), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def normalised(x: torch.Tensor, mean, std) -> torch.Tensor:
    return (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- loading: the three sources ----------------------------------------------------------------------


def test_torchscript_file_with_its_spec_beside_it_behaves_like_nics_own(tmp_path):
    model_file = torchscript_encoder(tmp_path / "ts", mean=[0.7, 0.6, 0.5], std=[0.2, 0.25, 0.3], name="tiny-ts")
    module, info = load_encoder(str(model_file))
    assert isinstance(module, ExternalEncoder) and not module.training
    x = tiles()
    out = module(x)
    assert out.dtype == torch.float32 and out.shape == (5, 24) and not out.requires_grad
    expected = tiny()(normalised(x, [0.7, 0.6, 0.5], [0.2, 0.25, 0.3]))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"expects tiles \(N, 3, 64, 64\)"):
        module(tiles(2, px=32))
    with pytest.raises(TypeError, match="uint8"):
        module(x.float())

    assert (info.name, info.kind, info.embedding_dim, info.tile_px, info.mpp) == ("tiny-ts", "external", 24, TILE, 0.5)
    assert info.architecture == f"torchscript:{model_file}"
    rec = info.external
    assert rec["source"] == "torchscript" and rec["weights_sha256"] == sha256(model_file)
    assert rec["mean"] == [0.7, 0.6, 0.5] and rec["std"] == [0.2, 0.25, 0.3] and rec["embedding_dim"] == 24
    assert rec["spec"] == str(tmp_path / "ts" / "model.yaml") and rec["content_hash"] == info.content_hash
    # a spec beside the file may leave `path` to it; named itself (or by its folder) it must say it
    with pytest.raises(EncoderSpecError, match=r"model\.yaml: source 'torchscript' needs 'path'"):
        load_encoder(str(tmp_path / "ts" / "model.yaml"))
    spec = yaml.safe_load((tmp_path / "ts" / "model.yaml").read_text())
    write_spec(tmp_path / "ts" / "model.yaml", **spec, path="model.pt")
    assert load_encoder(str(model_file))[1].content_hash == info.content_hash
    assert load_encoder(str(tmp_path / "ts" / "model.yaml"))[1].content_hash == info.content_hash
    (tmp_path / "ts" / "model.yaml").rename(tmp_path / "ts" / "encoder.yaml")
    assert load_encoder(str(tmp_path / "ts"))[1].content_hash == info.content_hash
    write_spec(tmp_path / "ts" / "encoder.yaml", **spec, path="other.pt")
    with pytest.raises(EncoderSpecError, match=r"encoder\.yaml: names path .*other\.pt, but the encoder named is "
                                                r".*model\.pt"):
        load_encoder(str(model_file))


def test_entry_point_in_a_folder_of_its_own_with_a_weights_file(tmp_path):
    spec_file, module_name = entrypoint_encoder(tmp_path / "ep", width=16, embedding_dim=16)
    module, info = load_encoder(str(spec_file))
    state = torch.load(tmp_path / "ep" / "weights.pth", weights_only=True)
    x = tiles()
    with torch.no_grad():
        pooled = nn.functional.adaptive_avg_pool2d(normalised(x, IMAGENET_MEAN, IMAGENET_STD), 8)
        expected = nn.functional.conv2d(pooled, state["proj.weight"], state["proj.bias"]).mean(dim=(2, 3))
    torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-5)
    rec = info.external
    assert rec["source"] == "entrypoint" and rec["model"] == f"{module_name}:build"
    assert rec["weights_sha256"] == sha256(tmp_path / "ep" / "weights.pth")
    assert rec["code_sha256"] == sha256(tmp_path / "ep" / f"{module_name}.py")  # the code is part of the encoder
    assert rec["mean"] == list(IMAGENET_MEAN) and rec["kwargs"] == {"width": 16}
    assert info.parameters == 16 * 3 + 16

    # a factory that takes `weights` is handed the path and loads it itself
    spec = yaml.safe_load(spec_file.read_text())
    write_spec(spec_file, **{**spec, "entrypoint": f"{module_name}:build_with_weights"})
    torch.testing.assert_close(load_encoder(str(spec_file))[0](x), expected, rtol=1e-5, atol=1e-5)


def test_a_fresh_process_loads_the_same_entry_point_as_a_ray_worker_would(tmp_path):
    """Workers unpickle the driver's resolved spec and import the module from the spec's folder,
    which is on no one's PYTHONPATH."""
    spec_file, module_name = entrypoint_encoder(tmp_path / "ep")
    spec = resolve_encoder(str(spec_file))
    info = load_encoder(spec)[1]
    (tmp_path / "spec.pkl").write_bytes(pickle.dumps(spec))
    code = ("import pickle, sys; from nic.encoders import load_encoder; "
            f"spec = pickle.load(open({str(tmp_path / 'spec.pkl')!r}, 'rb')); "
            f"assert {module_name!r} not in sys.modules; print(load_encoder(spec)[1].content_hash)")
    env = {**os.environ, "PYTHONPATH": str(REPO / "platform")}
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=tmp_path.parent, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == info.content_hash


def test_entry_point_and_timm_names_on_the_command_line_take_the_rest_from_flags(tmp_path, monkeypatch):
    spec_file, module_name = entrypoint_encoder(tmp_path / "ep")
    spec_file.unlink()  # no spec: everything from the encoder_* options
    monkeypatch.chdir(tmp_path / "ep")  # a module in the working folder is importable (and so on workers)
    spec = resolve_encoder(f"{module_name}:build", {"weights": "weights.pth", "tile_px": TILE, "mpp": 0.5})
    assert spec.source == "entrypoint" and spec.weights == str(tmp_path / "ep" / "weights.pth")
    assert str(tmp_path / "ep") in spec.python_path
    module, info = load_encoder(spec)
    assert module(tiles()).shape == (5, 16) and info.external["spec"] is None

    timm_spec = resolve_encoder("timm:vit_small_patch16_224", {"weights": "w.safetensors", "tile_px": 224, "mpp": 0.5})
    assert (timm_spec.source, timm_spec.architecture, timm_spec.weights) == (
        "timm", "vit_small_patch16_224", str(tmp_path / "ep" / "w.safetensors"))
    # a spec beside the weights file fills in what the flags leave open
    write_spec(tmp_path / "ep" / "w.yaml", source="timm", architecture="vit_small_patch16_224", tile_px=224, mpp=0.25,
               kwargs={"init_values": 1e-5})
    (tmp_path / "ep" / "w.safetensors").write_bytes(b"")
    timm_spec = resolve_encoder("timm:vit_small_patch16_224", {"weights": "w.safetensors"})
    assert (timm_spec.tile_px, timm_spec.mpp, timm_spec.kwargs) == (224, 0.25, {"init_values": 1e-5})


def test_flags_override_the_spec_and_nics_own_encoders_refuse_them(tmp_path):
    model_file = torchscript_encoder(tmp_path / "ts")
    base = load_encoder(str(model_file))[1]
    module, info = load_encoder(str(model_file), overrides={"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]})
    assert info.external["mean"] == [0.5, 0.5, 0.5] and info.content_hash != base.content_hash
    torch.testing.assert_close(module(tiles()), tiny()(normalised(tiles(), [0.5] * 3, [0.5] * 3)),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(EncoderSpecError, match="--encoder-tile-px describe your own encoder"):
        load_encoder("mean-rgb", overrides={"tile_px": 224})
    assert resolve_encoder("random") is None and resolve_encoder("mean-rgb", {"tile_px": None}) is None


def test_the_identity_follows_the_weights_not_the_file_name(tmp_path):
    model_file = torchscript_encoder(tmp_path / "a")
    first = load_encoder(str(model_file))[1].content_hash
    assert load_encoder(str(model_file))[1].content_hash == first  # stable
    shutil.copytree(tmp_path / "a", tmp_path / "moved")
    assert load_encoder(str(tmp_path / "moved" / "model.pt"))[1].content_hash == first  # moved: same encoder
    torch.jit.script(tiny(seed=7)).save(str(model_file))  # other weights under the same name
    assert load_encoder(str(model_file))[1].content_hash != first
    spec = yaml.safe_load((tmp_path / "moved" / "model.yaml").read_text())
    for change in ({"tile_px": 96}, {"mpp": 0.25}, {"mean": [0.1, 0.2, 0.3]}):
        write_spec(tmp_path / "moved" / "model.yaml", **{**spec, **change})
        assert load_encoder(str(tmp_path / "moved" / "model.pt"))[1].content_hash != first, change


# -- errors that name the file -----------------------------------------------------------------------


def test_errors_name_the_file_and_the_problem(tmp_path):
    spec_file, module_name = entrypoint_encoder(tmp_path / "ep")
    spec = yaml.safe_load(spec_file.read_text())

    def fails(fields: dict, match: str, error=EncoderSpecError):
        write_spec(spec_file, **fields)
        with pytest.raises(error, match=match) as err:
            load_encoder(str(spec_file))
        return str(err.value)

    message = fails({**spec, "weights": "missing.pth"}, r"missing\.pth: the weights file named by .*encoder\.yaml "
                    r"does not exist", FileNotFoundError)
    assert str(tmp_path / "ep") in message
    fails({**spec, "entrypoint": "no_such_module_xyz:build"},
          r"encoder\.yaml: entry point 'no_such_module_xyz:build': cannot import 'no_such_module_xyz'")
    fails({**spec, "entrypoint": f"{module_name}:nope"}, f"{module_name} has no callable 'nope'")
    fails({**spec, "entrypoint": f"{module_name}:not_a_module", "weights": None, "kwargs": {}},
          r"returned str, not a torch\.nn\.Module")
    fails({**spec, "entrypoint": f"{module_name}:feature_maps", "weights": None},
          r"encoder\.yaml.*returned shape \(2, 16, 62, 62\) for 2 tiles, expected \(2, C\)")
    fails({**spec, "embedding_dim": 32}, r"encoder\.yaml.*embedding_dim is 32 but the model returns 16")
    fails({**spec, "kwargs": {"width": 8}}, r"weights\.pth: weights do not fit the model")
    fails({k: v for k, v in spec.items() if k != "tile_px"}, r"encoder\.yaml: tile_px not given.*--encoder-tile-px")
    fails({**spec, "tile_px": "big"}, r"(?s)encoder spec .*encoder\.yaml.*key 'tile_px'")
    fails({**spec, "meen": [0, 0, 0]}, r"unknown key 'meen' \(did you mean 'mean'\?\)")
    fails({**spec, "source": "timm"}, r"source 'timm' takes 'architecture', not 'entrypoint'")
    fails({**spec, "std": [0.2, 0.0, 0.2]}, "std must be positive")
    write_spec(spec_file, **spec)
    torch.save({"proj.weight": torch.zeros(16, 3, 1, 1)}, tmp_path / "ep" / "weights.pth")
    with pytest.raises(EncoderSpecError, match=r"weights\.pth: 1 parameter\(s\) of the model are not in the "
                                                r"weights file, e\.g\. proj\.bias"):
        load_encoder(str(spec_file))
    torch.save({"proj.weight": torch.zeros(16, 3, 1, 1), "proj.bias": torch.zeros(16), "head.w": torch.zeros(2)},
               tmp_path / "ep" / "weights.pth")
    with pytest.raises(EncoderSpecError, match=r"1 key\(s\) of the weights file are not in the model, e\.g\. "
                                                r"head\.w \(set strict_weights: false"):
        load_encoder(str(spec_file))
    write_spec(spec_file, **spec, strict_weights=False)
    assert load_encoder(str(spec_file))[1].embedding_dim == 16
    (tmp_path / "ep" / "weights.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(EncoderSpecError, match=r"weights\.pth: not a weights file torch\.load can read"):
        load_encoder(str(spec_file))


def test_a_model_that_does_not_take_the_tile_size_fails_naming_its_file(tmp_path):
    folder = tmp_path / "fixed"
    folder.mkdir()
    fixed = nn.Sequential(nn.Flatten(), nn.Linear(3 * TILE * TILE, 8)).eval()
    torch.jit.trace(fixed, torch.zeros(1, 3, TILE, TILE)).save(str(folder / "fixed.pt"))
    write_spec(folder / "fixed.yaml", source="torchscript", tile_px=96, mpp=0.5)
    with pytest.raises(EncoderSpecError, match=r"fixed\.yaml \(torchscript .*fixed\.pt\): a forward pass over 2 "
                                                r"tiles of 96 x 96 px failed .*is tile_px 96 the size this model "
                                                r"takes\?"):
        load_encoder(str(folder / "fixed.pt"))
    write_spec(folder / "fixed.yaml", source="torchscript", tile_px=TILE, mpp=0.5)
    assert load_encoder(str(folder / "fixed.pt"))[1].embedding_dim == 8

    with pytest.raises(FileNotFoundError, match=r"nothing\.pt: no such file"):
        load_encoder(str(folder / "nothing.pt"))
    (folder / "junk.pt").write_bytes(b"junk")
    with pytest.raises(EncoderSpecError, match=r"junk\.pt: not a TorchScript file"):
        load_encoder(str(folder / "junk.pt"), overrides={"tile_px": TILE, "mpp": 0.5})


def test_a_model_returning_a_tuple_is_refused(tmp_path):
    class Pair(nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3)), x.amax(dim=(2, 3))

    torch.jit.script(Pair()).save(str(tmp_path / "pair.pt"))
    with pytest.raises(EncoderSpecError, match=r"pair\.pt.*returned tuple, not a tensor"):
        load_encoder(str(tmp_path / "pair.pt"), overrides={"tile_px": TILE, "mpp": 0.5})


# -- what compress does with it, without Ray ------------------------------------------------------------


def test_the_cli_flags_reach_the_config(tmp_path, capsys):
    model_file = torchscript_encoder(tmp_path / "ts")
    parser = build_parser()
    args = parser.parse_args(["compress", "--slides", "s.svs", "--encoder", str(model_file), "--out", str(tmp_path / "o"),
                              "--encoder-tile-px", "96", "--encoder-mpp", "0.25", "--encoder-mean", "0.5", "0.5", "0.5",
                              "--encoder-weights", "w.pth", "--encoder-embedding-dim", "24"])
    config = config_from_args(args)
    assert config.encoder_overrides() == {"weights": "w.pth", "tile_px": 96, "mpp": 0.25, "mean": [0.5, 0.5, 0.5],
                                          "embedding_dim": 24}
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    help_text = capsys.readouterr().out
    for flag in ("--encoder-weights", "--encoder-tile-px", "--encoder-mpp", "--encoder-mean", "--encoder-std",
                 "--encoder-embedding-dim"):
        assert flag in help_text


@pytest.fixture
def no_ray(monkeypatch):
    """These runs must stop before the encoder pool: Ray is never started."""
    def refuse(*args, **kwargs):
        raise AssertionError("this test must not reach Ray")

    monkeypatch.setattr("nic.compress.stage._compress_on_ray", refuse)
    monkeypatch.setattr("nic.runtime.connect", refuse)


def test_tile_size_or_resolution_unlike_the_slides_is_exit_2_naming_the_spec(tmp_path, real_slide, no_ray, capsys):
    model_file = torchscript_encoder(tmp_path / "ts")
    base = ["compress", "--slides", str(real_slide), "--encoder", str(model_file), "--out", str(tmp_path / "o")]
    assert main(base) == 2  # the spec says 64 px, the slides are tiled at 128
    err = capsys.readouterr().err
    assert f"encoder 'model' ({tmp_path / 'ts' / 'model.yaml'}) takes 64 px tiles but slide.tile_px is 128" in err
    assert main(base + ["--set", f"slide.tile_px={TILE}", "--encoder-mpp", "1.0"]) == 2
    assert "was trained at 1 um/px but slide.target_mpp is 0.5" in capsys.readouterr().err
    assert main(base + ["--set", f"slide.tile_px={TILE}", "--heads"]) == 2
    assert "is a 'external' encoder and has no task heads" in capsys.readouterr().err
    assert main(base + ["--set", f"slide.tile_px={TILE}", "--encoder-embedding-dim", "7"]) == 2
    assert "embedding_dim is 7 but the model returns 24" in capsys.readouterr().err


def _encode_slide_without_ray(spec: EncoderSpec | str, slide: Path, out: Path, tile_px: int, dim: int):
    """What nic compress does to one slide, in this process: plan, the actor, the collector."""
    from nic.compress.stage import encoder_facts

    config = CompressConfig(slides=[str(slide)], encoder=str(spec) if isinstance(spec, Path) else spec,
                            out=out, slide={"tile_px": tile_px})
    facts = encoder_facts(config)
    assert isinstance(facts.ref, EncoderSpec) and facts.embedding_dim == dim and facts.record["embedding_dim"] == dim
    options = SlideOptions(tile_px=tile_px)
    rows = plan_one("he", str(slide), options)
    assert rows["error"][0] == "" and len(rows["row"]) > 10
    actor = EncoderActor(facts.ref, options, {"he": str(slide)}, threads=1, encoder_hash=facts.content_hash)
    out_rows = actor(rows)
    assert out_rows["embedding"].dtype == np.float16 and out_rows["embedding"].shape == (len(rows["row"]), dim)
    collector = SlideCollector(out, facts, (0,), "opts", {"he": str(slide)})
    assert collector.add_batch(out_rows) == ["he"] and collector.results["he"]["status"] == "ok"
    return facts, actor, rows


def test_the_actor_and_collector_encode_the_real_slide_and_record_the_encoder(tmp_path, real_slide):
    spec_file, _ = entrypoint_encoder(tmp_path / "ep", width=16)
    facts, actor, rows = _encode_slide_without_ray(spec_file, real_slide, tmp_path / "grids", TILE, 16)
    meta = verify_grid_file(slide_file(tmp_path / "grids", "he"))
    assert (meta.embedding_dim, meta.tile_px, meta.encoder_hash, meta.encoder_name) == (
        16, TILE, facts.content_hash, "build")
    rec = meta.extra["encoder"]
    assert rec["source"] == "entrypoint" and rec["weights_sha256"] == sha256(tmp_path / "ep" / "weights.pth")
    assert (rec["tile_px"], rec["mpp"], rec["mean"], rec["std"]) == (TILE, 0.5, list(IMAGENET_MEAN), list(IMAGENET_STD))
    schema = pq.read_schema(slide_file(tmp_path / "grids", "he"))
    assert schema.field("embedding").type == pa.list_(pa.float16(), 16)
    grid, mask = load_grid(tmp_path / "grids", "he")
    assert grid.shape[0] == 16 and mask.sum() == len(rows["row"])
    # the grid holds what the module computes on the slide's own tiles (float16-rounded)
    reader = actor._reader("he", int(rows["grid_rows"][0]), int(rows["grid_cols"][0]))
    pixels = reader.read(rows["row"][:8], rows["col"][:8])
    module, _ = load_encoder(facts.ref)
    module.set_precision(actor.model.compute_dtype)  # bfloat16 on CPUs with native units, as the actor
    expected = module(torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()).numpy()
    np.testing.assert_allclose(grid[:, rows["row"][:8], rows["col"][:8]].T, expected, rtol=2e-3, atol=2e-3)
    # a worker that finds other weights than the driver hashed refuses to encode
    with pytest.raises(RuntimeError, match="differs from the driver's"):
        EncoderActor(facts.ref, SlideOptions(tile_px=TILE), {}, encoder_hash="0" * 64)


# -- grids with a large C ----------------------------------------------------------------------------


def test_a_grid_of_2048_channels_round_trips_in_float16(tmp_path):
    c, rows, cols = 2048, 5, 7
    rng = np.random.default_rng(0)
    cells = [(r, k) for r in range(rows) for k in range(cols) if (r + k) % 3]
    emb = rng.normal(0, 3, (len(cells), c)).astype(np.float32)
    meta = GridMeta(slide_id="big", path="", rows=rows, cols=cols, tile_px=224, mpp=0.5, level=0, tiles=len(cells),
                    embedding_dim=c, encoder_name="fm", encoder_hash="h" * 64,
                    extra={"encoder": {"source": "timm", "embedding_dim": c}})
    r, k = np.array(cells).T
    table = grid_table(meta, r, k, r * 224, k * 224, np.ones(len(cells), np.float32), emb)
    path = write_slide_grid(tmp_path, table, meta)
    assert pq.read_schema(path).field("embedding").type == pa.list_(pa.float16(), c)
    # float16: about 2 bytes per value plus Parquet's list levels (float32 would be 4)
    assert path.stat().st_size < len(cells) * c * 2.5
    back = verify_grid_file(path)
    assert back.embedding_dim == c and back.extra == {"encoder": {"source": "timm", "embedding_dim": c}}
    grid, mask = load_grid(tmp_path, "big")
    assert grid.shape == (c, rows, cols) and grid.dtype == np.float32 and mask.sum() == len(cells)
    np.testing.assert_array_equal(grid[:, r, k].T, emb.astype(np.float16).astype(np.float32))
    assert read_grid_meta(tmp_path, "big").extra["encoder"]["embedding_dim"] == c


@pytest.mark.parametrize("name", ["nic-cnn", "attention-mil"])
def test_downstream_models_take_2048_channel_grids(name):
    from nic.downstream.models import build_model

    model = build_model(name, 2048, 1).eval()
    grid = torch.randn(2, 2048, 12, 12)
    mask = torch.ones(2, 12, 12, dtype=torch.bool)
    with torch.no_grad():
        out = model(grid, mask)
    assert out.shape[0] == 2 and torch.isfinite(out).all()


# -- the pipeline and its report ---------------------------------------------------------------------


def test_the_pipeline_compares_your_encoder_with_trained_ones(tmp_path):
    model_file = torchscript_encoder(tmp_path / "ts")
    config = {"out": str(tmp_path / "study"),
              "encoders": [{"name": "mine", "kind": "external", "path": str(model_file),
                            "settings": {"slide": {"tile_px": TILE}, "encoder_mean": [0.5, 0.5, 0.5]}},
                           {"name": "mean-rgb", "kind": "mean-rgb"}]}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(config))
    layout, steps, inputs = plan_pipeline(load_config(PipelineConfig, path))
    assert [s.stage for s in steps].count("train-encoder") == 0
    mine = next(s for s in steps if s.stage == "compress" and s.config.encoder == str(model_file))
    assert mine.config.slide.tile_px == TILE and mine.config.encoder_mean == [0.5, 0.5, 0.5]
    other = next(s for s in steps if s.stage == "compress" and s.config.encoder == "mean-rgb")
    assert other.config.slide.tile_px == 128
    assert inputs["encoders"]["mine"] == str(model_file)
    assert inputs["encoder_overrides"] == {"mine": {"mean": [0.5, 0.5, 0.5]}}

    from nic.report.study import encoder_section

    table = "\n".join(encoder_section(inputs["encoders"], inputs["encoder_overrides"]))
    assert f"| mine | external | torchscript:{model_file} | 24 |" in table

    for bad, match in (({"name": "x", "kind": "external"}, "needs a path"),
                       ({"name": "x", "kind": "mtl", "path": "m.pt"}, "path is only for kind 'external'"),
                       ({"name": "x", "kind": "external", "path": "m.pt", "settings": {"encoder": "y"}},
                        "set by the pipeline")):
        path.write_text(yaml.safe_dump({"encoders": [bad]}))
        with pytest.raises(ConfigError, match=match):
            load_config(PipelineConfig, path)


# -- timm (an optional extra; nothing is downloaded) ---------------------------------------------------


def _timm():
    try:
        import timm
    except Exception as exc:  # not installed, or installed without torchvision
        pytest.skip(f"timm is not importable here ({type(exc).__name__}: {exc}); pip install 'nic[timm]'")
    return timm


@pytest.fixture(scope="module")
def timm_resnet(tmp_path_factory) -> Path:
    """resnet18 at random initialisation, its state dict (with its classifier) in a temporary folder
    and an encoder.yaml beside it: 224 px, C = 512."""
    timm = _timm()
    folder = tmp_path_factory.mktemp("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False)
    torch.save(model.state_dict(), folder / "resnet18.pth")
    write_spec(folder / "encoder.yaml", source="timm", architecture="resnet18", weights="resnet18.pth",
               tile_px=224, mpp=0.5, name="resnet18-random")
    return folder


@pytest.mark.parametrize("architecture", ["resnet18", "vit_tiny_patch16_224"])
def test_timm_architecture_at_random_init_at_224_px(architecture, tmp_path):
    timm = _timm()
    torch.manual_seed(0)
    reference = timm.create_model(architecture, pretrained=False)
    torch.save(reference.state_dict(), tmp_path / "w.pth")  # the classifier is in the file and ignored
    reference.reset_classifier(0)
    module, info = load_encoder(f"timm:{architecture}", overrides={"weights": str(tmp_path / "w.pth"),
                                                                  "tile_px": 224, "mpp": 0.5})
    x = tiles(3, px=224)
    cfg = reference.pretrained_cfg
    with torch.no_grad():
        expected = reference.eval()(normalised(x, cfg["mean"], cfg["std"]))
    torch.testing.assert_close(module(x), expected, rtol=1e-4, atol=1e-4)
    assert info.embedding_dim == reference.num_features and info.external["mean"] == list(cfg["mean"])
    assert info.architecture == f"timm:{architecture}" and info.external["weights_sha256"] == sha256(tmp_path / "w.pth")


def test_timm_errors(timm_resnet, tmp_path):
    with pytest.raises(EncoderSpecError, match="needs a local weights file"):
        load_encoder("timm:resnet18", overrides={"tile_px": 224, "mpp": 0.5})
    # the encoder.yaml beside the weights describes them: naming another architecture is an error
    with pytest.raises(EncoderSpecError, match=r"encoder\.yaml: describes timm 'resnet18', but the encoder named is "
                                                r"timm 'vit_tiny_patch16_224'"):
        load_encoder("timm:vit_tiny_patch16_224", overrides={"weights": str(timm_resnet / "resnet18.pth")})
    weights = shutil.copy(timm_resnet / "resnet18.pth", tmp_path / "weights.pth")  # no spec beside it
    with pytest.raises(EncoderSpecError, match="timm has no architecture 'resnet_eighteen'"):
        load_encoder("timm:resnet_eighteen", overrides={"weights": str(weights), "tile_px": 224, "mpp": 0.5})
    with pytest.raises(EncoderSpecError, match=r"weights\.pth: .* parameter\(s\) of the model are not in the weights"):
        load_encoder("timm:vit_tiny_patch16_224", overrides={"weights": str(weights), "tile_px": 224, "mpp": 0.5})
    with pytest.raises(EncoderSpecError, match=r"a forward pass over 2 tiles of 256 x 256 px failed.*img_size: 256"):
        load_encoder(str(_vit_spec(tmp_path, tile_px=256)))


def _vit_spec(folder: Path, tile_px: int) -> Path:
    """vit_tiny at random init whose spec says another tile size than the ViT's 224 px."""
    timm = _timm()
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict(), folder / "vit.pth")
    return write_spec(folder / "vit.yaml", source="timm", architecture="vit_tiny_patch16_224", weights="vit.pth",
                      tile_px=tile_px, mpp=0.5)


def test_timm_encoder_through_the_actor_on_the_real_slide(timm_resnet, tmp_path, real_slide):
    _encode_slide_without_ray(timm_resnet / "encoder.yaml", real_slide, tmp_path / "grids", 224, 512)
    meta = verify_grid_file(slide_file(tmp_path / "grids", "he"))
    assert meta.embedding_dim == 512 and meta.extra["encoder"]["source"] == "timm"


# -- nic compress end to end (Ray) -------------------------------------------------------------------

def ray_test(fn):
    """Marks of a test that runs nic compress on the session's shared Ray instance."""
    return pytest.mark.ray(pytest.mark.slow(pytest.mark.usefixtures("ray_session")(fn)))


def _compress(slide: Path, encoder: str, out: Path, tile_px: int, *extra: str) -> int:
    return main(["compress", "--slides", str(slide), "--encoder", encoder, "--out", str(out), "--batch-size", "64",
                 "--set", f"slide.tile_px={tile_px}", *extra])


def _rows(out: Path) -> dict[str, dict]:
    return {r["slide_id"]: r for r in pq.read_table(out / "slides.parquet").to_pylist()}


@ray_test
def test_nic_compress_with_a_torchscript_file_resumes_and_redoes_on_new_weights(tmp_path, real_slide, capsys):
    model_file = torchscript_encoder(tmp_path / "ts", width=24)
    out = tmp_path / "grids"
    assert _compress(real_slide, str(model_file), out, TILE) == 0
    row = _rows(out)["small_HE"]
    assert row["status"] == "ok" and row["embedding_dim"] == 24 and row["tiles"] > 10
    meta = read_grid_meta(out, "small_HE")
    _, info = load_encoder(str(model_file))
    assert (meta.embedding_dim, meta.tile_px, meta.encoder_hash, meta.encoder_name) == (24, TILE, info.content_hash,
                                                                                        "model")
    rec = meta.extra["encoder"]
    assert rec["source"] == "torchscript" and rec["weights_sha256"] == sha256(model_file)
    assert (rec["tile_px"], rec["mpp"], rec["mean"], rec["std"]) == (TILE, 0.5, list(IMAGENET_MEAN), list(IMAGENET_STD))
    assert pq.read_schema(slide_file(out, "small_HE")).field("embedding").type == pa.list_(pa.float16(), 24)
    grid, mask = load_grid(out, "small_HE")
    assert grid.shape[0] == 24 and mask.sum() == row["tiles"] and np.isfinite(grid).all()
    capsys.readouterr()

    assert _compress(real_slide, str(model_file), out, TILE) == 0  # the same encoder: nothing to do
    assert _rows(out)["small_HE"]["status"] == "skipped"
    torch.jit.script(tiny(seed=5)).save(str(model_file))  # new weights, same file name: a different encoder
    capsys.readouterr()
    assert _compress(real_slide, str(model_file), out, TILE) == 0
    assert "encoder changed" in capsys.readouterr().err
    assert _rows(out)["small_HE"]["status"] == "ok"
    assert read_grid_meta(out, "small_HE").extra["encoder"]["weights_sha256"] == sha256(model_file)


@ray_test
def test_nic_compress_with_an_entry_point_of_2048_channels(tmp_path, real_slide):
    """The module lives only in a temporary folder: the Ray workers import it from the spec's folder."""
    spec_file, module_name = entrypoint_encoder(tmp_path / "ep", width=2048, name="wide")
    out = tmp_path / "grids"
    assert _compress(real_slide, str(spec_file), out, TILE) == 0
    row = _rows(out)["small_HE"]
    assert row["status"] == "ok" and row["embedding_dim"] == 2048
    meta = read_grid_meta(out, "small_HE")
    assert meta.encoder_name == "wide" and meta.extra["encoder"]["model"] == f"{module_name}:build"
    assert meta.extra["encoder"]["code_sha256"] == sha256(tmp_path / "ep" / f"{module_name}.py")
    assert pq.read_schema(slide_file(out, "small_HE")).field("embedding").type == pa.list_(pa.float16(), 2048)
    grid, mask = load_grid(out, "small_HE")
    assert grid.shape[0] == 2048 and mask.sum() == row["tiles"]
    compressed_json = json.loads(json.dumps(meta.extra))  # what the metadata holds is plain JSON
    assert compressed_json["encoder"]["embedding_dim"] == 2048


@ray_test
def test_nic_compress_with_a_timm_architecture_at_224_px(timm_resnet, tmp_path, real_slide):
    out = tmp_path / "grids"
    assert _compress(real_slide, str(timm_resnet / "encoder.yaml"), out, 224) == 0
    row = _rows(out)["small_HE"]
    assert row["status"] == "ok" and row["embedding_dim"] == 512 and row["encoder_name"] == "resnet18-random"
    meta = read_grid_meta(out, "small_HE")
    rec = meta.extra["encoder"]
    assert (rec["source"], rec["model"], rec["tile_px"], rec["embedding_dim"]) == ("timm", "resnet18", 224, 512)
    assert rec["weights_sha256"] == sha256(timm_resnet / "resnet18.pth")
    assert pq.read_schema(slide_file(out, "small_HE")).field("embedding").type == pa.list_(pa.float16(), 512)
    grid, mask = load_grid(out, "small_HE")
    assert grid.shape[0] == 512 and mask.sum() == row["tiles"]
    # the same encoder given as timm:<arch> plus flags is the same encoder: nothing to redo
    assert _compress(real_slide, "timm:resnet18", out, 224, "--encoder-weights", str(timm_resnet / "resnet18.pth"),
                     "--encoder-tile-px", "224", "--encoder-mpp", "0.5") == 0
    assert _rows(out)["small_HE"]["status"] == "skipped"
