"""`nic compress --heads`: an MTL encoder's head outputs per tile as named float32 grid columns.

The encoder here is untrained (seeded weights, heads and decoders saved as nic train-encoder saves
them): what is tested is that every head's output lands in the right column of the right tile,
not that it is a good prediction. Its five tasks cover every kind: binary, multiclass, regression,
segmentation and typed nuclei.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from compress_support import L_CELLS, TILE, colour_image, compress_args, manifest_rows, write_slide
from nic.cli.main import main
from nic.encoders.artifact import EncoderInfo, load_patch_encoder, save_encoder
from nic.encoders.encoder import PatchEncoder, build_encoder
from nic.encoders.head_maps import head_columns
from nic.encoders.objectives import MultiTaskObjective, TaskHeadSpec
from nic.grids.schema import BASE_COLUMNS, GridMeta, slide_file

pytestmark = pytest.mark.usefixtures("ray_session")

C = 16
SEED = 1  # of the heads and decoders (the trunk has its own)
TISSUE = ["stroma", "tumour", "fat"]
REGIONS = ["background", "epithelium", "stroma"]
NUCLEI = ["tumour", "lymphocyte"]
TASKS = [
    TaskHeadSpec("tumour", "binary", 1, classes=["normal", "tumour"]),
    TaskHeadSpec("tissue", "multiclass", 3, classes=TISSUE),
    TaskHeadSpec("cellularity", "regression", 1, target_mean=40.0, target_std=10.0),
    TaskHeadSpec("regions", "segmentation", 3, classes=REGIONS, background=0),
    TaskHeadSpec("cells", "nuclei", 3 + len(NUCLEI) + 1, classes=NUCLEI),
]
EXPECTED = (["head:tumour"] + [f"head:tissue={c}" for c in TISSUE] + ["head:cellularity"]
            + [f"head:regions={c}" for c in REGIONS] + ["head:cells"] + [f"head:cells={c}" for c in NUCLEI])


def _save(out, kind: str = "mtl"):
    encoder = build_encoder("reference", C, TILE, seed=3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        objective = MultiTaskObjective(encoder, TASKS)
    with torch.no_grad():  # sharper last layers, so untrained outputs differ from tile to tile
        for head in objective.heads.values():
            head.weight.mul_(30.0)
        for decoder in objective.decoders.values():
            decoder.out.weight.mul_(10.0)
    info = EncoderInfo(name=out.name, kind=kind, architecture="reference", embedding_dim=C, tile_px=TILE,
                       tasks=[t.to_dict() for t in TASKS], content_hash="")
    save_encoder(encoder, out, info, extra_state=objective.extra_state() if kind == "mtl" else None)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    slides = root / "slides"
    slides.mkdir()
    image = colour_image(texture=True, seed=4)
    write_slide(slides / "a.tiff", image)
    return {"root": root, "slides": slides, "image": image, "encoder": _save(root / "mtl-enc")}


def _tiles(image: np.ndarray, cells) -> torch.Tensor:
    """The tiles at `cells` as the actor hands them over: NHWC memory seen as NCHW."""
    tiles = np.stack([image[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE] for r, c in cells])
    return torch.from_numpy(tiles).permute(0, 3, 1, 2)


def _direct_heads(encoder_dir, x: torch.Tensor) -> np.ndarray:
    """Every head's per-tile output computed here in plain torch and NumPy, from heads.pt."""
    from nic.encoders.dense_metrics import instance_types, instances_from_classes

    encoder, _ = load_patch_encoder(encoder_dir)
    objective = MultiTaskObjective(encoder, TASKS).eval()
    state = torch.load(encoder_dir / "heads.pt", weights_only=True)
    objective.heads.load_state_dict(state["heads"])
    objective.decoders.load_state_dict(state["decoders"])
    with torch.inference_mode():
        maps = encoder.trunk.feature_maps(PatchEncoder.normalise(x))
        emb = encoder.trunk.embed_maps(maps)
        tumour = torch.sigmoid(objective.heads["tumour"](emb))[:, 0].numpy()
        tissue = torch.softmax(objective.heads["tissue"](emb), 1).numpy()
        cellularity = (objective.heads["cellularity"](emb)[:, 0] * 10.0 + 40.0).numpy()
        regions = objective.decoders["regions"](maps, out_px=TILE).argmax(1).numpy()
        cells = objective.decoders["cells"](maps, out_px=TILE)
    fractions = np.stack([(regions == k).mean(axis=(1, 2)) for k in range(3)], axis=1)
    counts = []
    for i in range(len(x)):
        inst = instances_from_classes(cells[i, :3].argmax(0).numpy())
        types = instance_types(inst, cells[i, 3:].argmax(0).numpy(), len(NUCLEI))
        counts.append([inst.max(initial=0), (types == 1).sum(), (types == 2).sum()])
    return np.column_stack([tumour, tissue, cellularity, fractions, np.array(counts, np.float64)])


def test_head_columns_are_named_per_task_kind():
    assert head_columns(TASKS) == EXPECTED
    meta = GridMeta(slide_id="s", path="", rows=1, cols=1, tile_px=TILE, mpp=0.5, level=0, tiles=1,
                    embedding_dim=C, encoder_name="e", encoder_hash="h")
    assert b"nic.head_columns" not in meta.to_metadata()  # grids without heads keep their exact keys
    with_heads = GridMeta(**{**meta.__dict__, "head_columns": tuple(EXPECTED)})
    assert GridMeta.from_metadata(with_heads.to_metadata(), "x").head_columns == tuple(EXPECTED)


def test_heads_columns_read_with_plain_pyarrow_and_match_torch(setup, capsys):
    root, slides, encoder = setup["root"], setup["slides"], setup["encoder"]
    plain, heads = root / "plain", root / "with-heads"
    assert main(compress_args([slides], plain, str(encoder), "--no-mixed-precision")) == 0
    assert main(compress_args([slides], heads, str(encoder), "--no-mixed-precision", "--heads")) == 0
    assert "11 head-map columns" in capsys.readouterr().err

    table = pq.read_table(slide_file(heads, "a"))
    assert table.column_names == list(BASE_COLUMNS) + EXPECTED
    assert all(str(table.schema.field(name).type) == "float" for name in EXPECTED)
    meta = GridMeta.from_metadata(table.schema.metadata, "a")
    assert meta.head_columns == tuple(EXPECTED)
    frame = table.to_pandas()
    assert len(frame) == len(L_CELLS)

    # ranges: probabilities in [0, 1], class probabilities and region fractions sum to 1, counts >= 0
    assert frame["head:tumour"].between(0, 1).all()
    np.testing.assert_allclose(frame[[f"head:tissue={c}" for c in TISSUE]].sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(frame[[f"head:regions={c}" for c in REGIONS]].sum(axis=1), 1.0, atol=1e-5)
    counts = frame[["head:cells"] + [f"head:cells={c}" for c in NUCLEI]].to_numpy()
    assert (counts >= 0).all() and (counts == np.round(counts)).all()
    assert (counts[:, 1:].sum(axis=1) <= counts[:, 0]).all()
    assert frame["head:tumour"].std() > 0 and (counts[:, 1:].max(axis=0) > 0).all()  # varied, both types

    # the values are the heads' outputs for those tiles, computed directly
    cells = [L_CELLS[i] for i in (0, 5, 9, 13)]
    expected = _direct_heads(encoder, _tiles(setup["image"], cells))
    by_cell = frame.set_index(["row", "col"])
    got = np.stack([by_cell.loc[cell, EXPECTED].to_numpy(np.float64) for cell in cells])
    np.testing.assert_allclose(got[:, :5], expected[:, :5], rtol=1e-4, atol=1e-5)  # patch heads
    np.testing.assert_allclose(got[:, 5:8], expected[:, 5:8], atol=3 / TILE ** 2)  # region fractions
    np.testing.assert_array_equal(got[:, 8:], expected[:, 8:])  # nucleus counts, total and per type

    # without --heads nothing changed: no head column, no metadata key, the same rows and embeddings
    base = pq.read_table(slide_file(plain, "a"))
    assert base.column_names == list(BASE_COLUMNS)
    assert b"nic.head_columns" not in base.schema.metadata
    assert base.equals(table.select(list(BASE_COLUMNS)))
    assert manifest_rows(plain)["a"]["options_hash"] != manifest_rows(heads)["a"]["options_hash"]

    # resume: a grid made without heads is redone by a run with --heads, then skipped
    assert main(compress_args([slides], plain, str(encoder), "--no-mixed-precision", "--heads")) == 0
    assert manifest_rows(plain)["a"]["status"] == "ok"
    assert pq.read_schema(slide_file(plain, "a")).names == list(BASE_COLUMNS) + EXPECTED
    assert main(compress_args([slides], plain, str(encoder), "--no-mixed-precision", "--heads")) == 0
    assert manifest_rows(plain)["a"]["status"] == "skipped"

    # nic grids show --channel draws a head map (and an embedding channel) over the thumbnail
    picture = root / "tumour.png"
    assert main(["grids", "show", "--grids", str(heads), "--slide", "a", "--channel", "head:tumour",
                 "--out", str(picture)]) == 0
    assert picture.stat().st_size > 10_000
    assert main(["grids", "show", "--grids", str(heads), "--slide", "a", "--channel", "embedding:3",
                 "--out", str(root / "emb.png")]) == 0
    assert main(["grids", "show", "--grids", str(heads), "--slide", "a", "--channel", "head:nope",
                 "--out", str(root / "x.png")]) == 2
    assert "head:cells=lymphocyte" in capsys.readouterr().err  # the error lists the names there are


def test_heads_need_an_mtl_encoder(setup, capsys):
    root, slides = setup["root"], setup["slides"]
    assert main(compress_args([slides], root / "r", "random", "--heads")) == 2
    err = capsys.readouterr().err
    assert "'random'" in err and "no task heads" in err and "mtl" in err
    contrastive = _save(root / "simclr", kind="contrastive")
    assert main(compress_args([slides], root / "c", str(contrastive), "--heads")) == 2
    err = capsys.readouterr().err
    assert "'simclr'" in err and "'contrastive' encoder" in err
    assert not (root / "r" / "tiles").exists() and not (root / "c" / "tiles").exists()
