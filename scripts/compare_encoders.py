"""The paper's comparison on a synthetic cohort: grids from an MTL encoder vs an unsupervised encoder vs
mean-RGB, each used to learn every slide-level target; writes one Markdown table.

    python scripts/compare_encoders.py --cohort runs/demo/cohort --work runs/compare \
        --write benchmarks/results/downstream_comparison.md

Steps (every stage skips what it finds complete, so a re-run resumes):
  1. nic train-encoder for each trained encoder kind (configs/demo/train_encoder.yaml + --kind),
  2. nic compress of the cohort's slides with each encoder (mean-rgb needs no training),
  3. nic train-downstream for each (encoder, target) with configs/demo/train_downstream_<target>.yaml,
  4. a table of each target's primary metric with its bootstrap 95 % CI (out-of-fold).
Stages run in this process through the `nic` CLI entry point, so they share one Ray instance.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUILTIN = {"mean-rgb", "random"}
TARGETS = {"proliferation": "regression", "growth_pattern": "binary", "survival": "survival"}
METRIC_NAMES = {"spearman": "Spearman", "roc_auc": "ROC AUC", "c_index": "C-index", "kappa_quadratic": "QW kappa"}


def _nic(args: list[str], attempts: int = 3) -> int:
    """Run one `nic` command in this process; retried when Ray itself fails (e.g. a node that does
    not start in time on an overloaded machine), which the stages then resume from their outputs."""
    import ray

    from nic.cli.main import main

    print("$ nic " + " ".join(args), file=sys.stderr, flush=True)
    for attempt in range(1, attempts + 1):
        try:
            return main(args)
        except Exception as exc:  # noqa: BLE001 - Ray start-up and connection errors have many types
            print(f"attempt {attempt} of `nic {args[0]}` failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            if ray.is_initialized():
                ray.shutdown()
            time.sleep(10)
    return 1


def _grids_complete(grids: Path) -> bool:
    manifest = grids / "slides.parquet"
    if not manifest.exists():
        return False
    import pyarrow.parquet as pq

    status = pq.read_table(manifest, columns=["status"]).column("status").to_pylist()
    return bool(status) and all(s in ("ok", "skipped") for s in status)


def _cell(metrics_path: Path) -> tuple[str, dict | None]:
    if not metrics_path.exists():
        return "failed", None
    data = json.loads(metrics_path.read_text())
    primary = data["primary_metric"]
    m = data.get("cv", {}).get("metrics", {}).get(primary)
    if not m or m["value"] is None:
        return "n/a", data
    ci = f" [{m['ci_low']:.2f}, {m['ci_high']:.2f}]" if m["ci_low"] is not None else ""
    extra = ""
    fm = data["cv"].get("fold_mean", {}).get(primary)
    if fm:
        extra += f"; folds {fm['mean']:.2f}"
    p = data["cv"].get("plots", {}).get("logrank_p")
    if p is not None:
        extra += f", log-rank p {p:.2g}"
    return f"{m['value']:.3f}{ci}{extra}", data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cohort", type=Path, required=True, help="Folder written by nic synth (slides/, labels.csv, tasks.yaml).")
    parser.add_argument("--work", type=Path, required=True, help="Folder for encoders/, grids/ and downstream/.")
    parser.add_argument("--encoders", nargs="+", default=["mtl", "contrastive", "mean-rgb"],
                        help="Encoder kinds to compare (trained ones use --encoder-config).")
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--encoder-config", type=Path, default=REPO / "configs/demo/train_encoder.yaml")
    parser.add_argument("--downstream-config-dir", type=Path, default=REPO / "configs/demo",
                        help="Folder with train_downstream_<target>.yaml.")
    parser.add_argument("--model", default=None, choices=["nic-cnn", "attention-mil"],
                        help="Downstream model (default: the configs').")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="Extra train-downstream key=value for every run (repeatable).")
    parser.add_argument("--reuse-grids", action="store_true",
                        help="Skip training and compression for an encoder whose grid store is already complete "
                        "(every slide ok in slides.parquet), e.g. after the encoder code changed.")
    parser.add_argument("--num-cpus", type=int, default=None)
    parser.add_argument("--write", type=Path, default=None, help="Write the Markdown table to this file.")
    args = parser.parse_args(argv)

    started = time.monotonic()
    cpus = ["--num-cpus", str(args.num_cpus)] if args.num_cpus else []
    work = args.work
    status: dict[str, str] = {}
    for kind in args.encoders:
        encoder = kind
        if args.reuse_grids and _grids_complete(work / "grids" / kind):
            print(f"reusing the complete grid store {work / 'grids' / kind}", file=sys.stderr)
        elif kind not in BUILTIN:
            encoder = str(work / "encoders" / kind)
            code = _nic(["train-encoder", "--config", str(args.encoder_config), "--tasks", str(args.cohort / "tasks.yaml"),
                         "--kind", kind, "--out", encoder, *cpus])
            if code:
                status[kind] = f"train-encoder exit {code}"
                continue
        if not (args.reuse_grids and _grids_complete(work / "grids" / kind)):
            code = _nic(["compress", "--slides", str(args.cohort / "slides"), "--encoder", encoder,
                         "--out", str(work / "grids" / kind), *cpus])
            if code:
                status[kind] = f"compress exit {code}"
                continue
        for target in args.targets:
            cmd = ["train-downstream", "--config", str(args.downstream_config_dir / f"train_downstream_{target}.yaml"),
                   "--grids", str(work / "grids" / kind), "--labels", str(args.cohort / "labels.csv"),
                   "--out", str(work / "downstream" / kind / target), *cpus]
            if args.model:
                cmd += ["--model", args.model]
            for item in args.overrides:
                cmd += ["--set", item]
            _nic(cmd)

    header = ["encoder"] + [f"{t} ({TARGETS[t]})" for t in args.targets]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    metric_of: dict[str, str] = {}
    model_name = None
    for kind in args.encoders:
        row = [kind]
        for target in args.targets:
            if kind in status:
                row.append(status[kind])
                continue
            text, data = _cell(work / "downstream" / kind / target / "metrics.json")
            if data:
                metric_of[target] = METRIC_NAMES.get(data["primary_metric"], data["primary_metric"])
                model_name = data["model"]
            row.append(text)
        lines.append("| " + " | ".join(row) + " |")
    legend = ", ".join(f"{t}: {m}" for t, m in metric_of.items())
    table = "\n".join(lines)
    note = (f"Out-of-fold {legend}: pooled value [bootstrap 95 % CI]; folds = mean of the per-fold values; "
            f"downstream model {model_name}; {(time.monotonic() - started) / 60:.0f} min for this invocation "
            "(stages skip completed work).")
    text = table + "\n\n" + note + "\n"
    print(text)
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(text)
    return 0 if not status else 1


if __name__ == "__main__":
    sys.exit(main())
