"""Make docs/images/head_map.png: a head map from a tiny run (about a minute on 2 CPUs).

    nic synth --out /tmp/hm/cohort --slides 1 --size 2400 --seed 7 --set min_size=2000 \
        --set patches.train=200 --set patches.val=40 --set "patches.tasks=[tumour, nuclei]" --num-cpus 1
    python docs/images/make_head_map.py /tmp/hm

It trains a small MTL encoder (reference trunk, C=32; the synth tumour patch task and the typed
nuclei task) in-process for a few seconds, saves it as nic train-encoder would, compresses the
synthetic slide with heads (as `nic compress --heads` does, in-process) and draws `head:tumour`
with `nic grids show --channel`. A few
seconds of training make a rough tumour detector, not a good one: the picture shows what a head
map looks like, not how good the encoder is.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from nic.encoders.artifact import EncoderInfo, save_encoder
from nic.encoders.encoder import build_encoder
from nic.encoders.objectives import MultiTaskObjective, TaskHeadSpec

TRAIN_SECONDS = 8.0
NUCLEUS_TYPES = ["tumour", "lymphocyte", "stroma", "mitotic_figure"]


def train(cohort: Path, out: Path) -> Path:
    torch.manual_seed(0)
    with h5py.File(cohort / "patches/tumour/train.h5") as h:
        xt, yt = h["x"][:], h["y"][:].reshape(-1)
    with h5py.File(cohort / "patches/nuclei/train.h5") as h:
        xn, inst, types = h["x"][:], h["y"][:].astype(np.int64), h["types"][:].astype(np.int64)
    tasks = [TaskHeadSpec("tumour", "binary", 1, classes=["non_tumour", "tumour"]),
             TaskHeadSpec("nuclei", "nuclei", 3 + len(NUCLEUS_TYPES) + 1, classes=NUCLEUS_TYPES)]
    encoder = build_encoder("reference", 32, 128, seed=0)
    objective = MultiTaskObjective(encoder, tasks).train()
    optimiser = torch.optim.Adam(objective.parameters(), lr=2e-3)
    rng = np.random.default_rng(0)
    start, steps = time.monotonic(), 0
    while time.monotonic() - start < TRAIN_SECONDS:
        a, b = rng.choice(len(xt), 16), rng.choice(len(xn), 8)
        x = torch.from_numpy(np.concatenate([xt[a], xn[b]])).permute(0, 3, 1, 2).float() / 255
        task_ids = torch.tensor([0] * 16 + [1] * 8)
        labels = torch.tensor(np.concatenate([yt[a], np.zeros(8)]), dtype=torch.float32)
        masks = torch.full((24, 2, 128, 128), -1, dtype=torch.long)
        masks[16:, 0], masks[16:, 1] = torch.from_numpy(inst[b]), torch.from_numpy(types[b])
        loss = objective(x, task_ids, labels, masks=masks)["loss"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        steps += 1
    print(f"trained {steps} steps in {time.monotonic() - start:.1f} s, last loss {float(loss.detach()):.3f}")
    info = EncoderInfo(name="mtl-tiny", kind="mtl", architecture="reference", embedding_dim=32, tile_px=128,
                       tasks=[t.to_dict() for t in tasks], content_hash="")
    save_encoder(encoder.eval(), out, info, extra_state=objective.extra_state())
    return out


def compress(slides: Path, encoder: Path, grids: Path) -> str:
    """What `nic compress --heads` does, minus Ray: plan, encode with heads, write the grid (the
    same EncoderActor and SlideCollector; used here because Ray starts slowly on a busy 2-CPU box)."""
    from nic.compress.actors import EncoderActor, plan_one
    from nic.compress.collector import EncoderFacts, SlideCollector
    from nic.config.slides import SlideOptions
    from nic.encoders.head_maps import load_head_mapper

    slide = sorted(slides.glob("*.tif*"))[0]
    sid, options = slide.name.split(".")[0], SlideOptions()
    columns = load_head_mapper(encoder).columns
    actor = EncoderActor(str(encoder), options, {sid: str(slide)}, head_columns=columns, threads=2)
    facts = EncoderFacts("mtl-tiny", "tiny", 32, columns)
    collector = SlideCollector(grids, facts, (0,), "", {sid: str(slide)})
    assert collector.add_batch(actor(plan_one(sid, str(slide), options))) == [sid], collector.results
    return sid


def main(root: Path) -> None:
    encoder = train(root / "cohort", root / "encoder")
    grids = root / "grids"
    sid = compress(root / "cohort/slides", encoder, grids)
    picture = Path(__file__).resolve().parent / "head_map.png"
    subprocess.run([str(Path(sys.executable).parent / "nic"), "grids", "show", "--grids", str(grids), "--slide", sid,
                    "--channel", "head:tumour", "--thumbnail-px", "800", "--out", str(picture)], check=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
