"""`report.md` of a pipeline run: what was done, how well it worked, and the pictures to check it.

The report only reads the artifacts the stages wrote (encoder.json, slides.parquet, metrics.json
and their PNGs), so it can be rebuilt at any time from a finished run without training anything.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd

from nic.artifacts import write_bytes_atomic
from nic.report.figures import plot_comparison
from nic.report.markdown import image, table
from nic.report.oracle import oracle_ceilings

METRIC_NAMES = {
    "spearman": "Spearman", "pearson": "Pearson", "roc_auc": "ROC AUC", "accuracy": "accuracy",
    "c_index": "C-index", "kappa": "quadratic kappa", "kappa_quadratic": "quadratic kappa",
    "concordance_index": "C-index",
}
PROBE_NOTE = (
    "The **linear probe** is a baseline fitted in seconds on the same folds and scored the same way: "
    "ridge, logistic or penalised Cox regression on each slide's mean and standard deviation of every "
    "grid channel over its tissue, the penalty chosen by cross-validation inside each fold's training "
    "slides. A probe near chance says the grids carry little of the target whatever model reads them; "
    "a trained model well below its probe has not learned what the grids do carry.")


def _rel(path: Path, start: Path) -> str:
    return os.path.relpath(path, start)


def _fmt_metric(entry: dict | None) -> str:
    if not entry or entry.get("value") is None:
        return "n/a"
    text = f"{entry['value']:.3f}"
    if entry.get("ci_low") is not None and entry.get("ci_high") is not None:
        text += f" [{entry['ci_low']:.2f}, {entry['ci_high']:.2f}]"
    return text


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def cohort_section(labels_path: Path, cohort_dir: Path | None) -> list[str]:
    lines = ["## Cohort", ""]
    try:
        labels = pd.read_csv(labels_path) if str(labels_path).endswith(".csv") else pd.read_parquet(labels_path)
    except (OSError, ValueError) as exc:
        return lines + [f"Labels could not be read ({labels_path}: {exc}).", ""]
    facts = [["slides", str(len(labels))]]
    if "patient_id" in labels:
        facts.append(["patients", str(labels["patient_id"].nunique())])
    if "growth_pattern" in labels:
        facts.append(["growth pattern = 1 (desmoplastic)", f"{int(labels['growth_pattern'].sum())} of {len(labels)}"])
    if "proliferation" in labels:
        p = labels["proliferation"]
        facts.append(["proliferation score", f"mean {p.mean():.2f}, sd {p.std():.2f}"])
    if {"time", "event"} <= set(labels.columns):
        facts.append(["survival", f"{int(labels['event'].sum())} events, {int((labels['event'] == 0).sum())} censored, "
                                  f"median follow-up {labels['time'].median():.1f}"])
    lines += table(["", "value"], facts) + [""]
    truth = _read_json(cohort_dir / "truth.json") if cohort_dir else None
    if truth and cohort_dir is not None:  # (truth is only read from a cohort_dir)
        lines += ["Synthetic cohort: every target comes from hidden per-slide parameters recorded in "
                  f"`{_rel(cohort_dir / 'truth.json', cohort_dir.parent)}` (seed {truth.get('seed', '?')}).", ""]
        lines += oracle_lines(cohort_dir / "truth.json")
    return lines


def oracle_lines(truth_path: Path) -> list[str]:
    """The ceilings a perfect reader of the hidden truth reaches (nic.report.oracle), as a table."""
    ceilings = oracle_ceilings(truth_path)
    if not ceilings:
        return []
    rows = [[name, METRIC_NAMES.get(c["metric"], c["metric"]), c["truth"], _fmt_metric(c)]
            for name, c in ceilings.items()]
    return ["### Oracle ceilings", "",
            "What the hidden truth itself scores against the labels (label noise and censoring bound every "
            "model below these; bootstrap 95 % CIs over slides):", "",
            *table(["target", "metric", "predictor", "value [95 % CI]"], rows), ""]


def _encoder_metrics(metrics: dict) -> str:
    """Task metrics of a supervised encoder; an unsupervised one has only its own losses to show."""
    values = {k: v for k, v in metrics.items() if v is not None and k != "epoch"}
    if not values:
        return "(no training)"
    shown = {k: v for k, v in values.items() if not k.endswith("loss")} or values
    text = ", ".join(f"{k} {v:.3f}" for k, v in sorted(shown.items()))
    epoch = metrics.get("epoch")
    return f"best epoch {int(epoch)}: {text}" if epoch is not None else text


def encoder_section(names: dict[str, str], overrides: dict[str, dict] | None = None) -> list[str]:
    """The encoders table; `overrides` are your own encoders' encoder_* compress options, by name."""
    from nic.encoders import load_encoder

    rows = []
    for name, ref in names.items():
        try:
            _, info = load_encoder(ref, overrides=(overrides or {}).get(name))
        except Exception as exc:  # a report must still be written when one encoder is unusable
            rows.append([name, "unreadable", "", "", "", str(exc)[:120]])
            continue
        rows.append([name, info.kind, info.architecture, str(info.embedding_dim), f"{info.parameters:,}",
                     _encoder_metrics(info.metrics)])
    return ["## Encoders", "",
            *table(["encoder", "kind", "architecture", "C", "parameters", "validation metrics"], rows), ""]


def compression_section(grids: dict[str, Path]) -> list[str]:
    from nic.grids.reader import read_manifest

    rows: list[list[str]] = []
    failures: list[list[object]] = []
    for name, folder in grids.items():
        try:
            manifest = read_manifest(folder)
        except Exception as exc:
            rows.append([name, "n/a", "", "", "", str(exc)[:100]])
            continue
        manifest = manifest[manifest["error_kind"] != "duplicate"]  # inputs repeating another: no slide
        status = manifest["status"].value_counts()
        done = manifest[manifest["status"] != "failed"]
        rows.append([name, str(int(status.get("ok", 0) + status.get("skipped", 0))), str(int(status.get("failed", 0))),
                     f"{int(done['tiles'].sum()):,}", f"{manifest['seconds'].sum():.0f} s", ""])
        if not failures:
            failures = [[r.slide_id, r.reason] for r in manifest[manifest["status"] == "failed"].itertuples()]
    lines = ["## Compression", "",
             *table(["encoder", "slides ok", "failed", "tissue tiles", "encoding time (sum over slides)", "note"], rows), ""]
    if failures:
        lines += ["Slides that could not be compressed:", "", *table(["slide", "reason"], failures), ""]
    return lines


def grid_pictures(grids: dict[str, Path], report_dir: Path, root: Path, count: int) -> list[str]:
    from nic.grids.reader import list_slides
    from nic.grids.show import render_grid_png

    if count == 0 or not grids:
        return []
    lines = ["## Slides and their feature grids", "",
             "Each slide's thumbnail beside its feature grid, the embeddings of its tissue tiles projected "
             "to RGB by PCA: tissue the encoder tells apart shows in different colours.", ""]
    for name, folder in grids.items():
        slides = list_slides(folder)[:count]
        for slide_id in slides:
            png = report_dir / f"grid_{name}_{slide_id}.png"
            if not png.exists():
                render_grid_png(folder, slide_id, png, thumbnail_px=512)
            lines.append(image(f"{slide_id}, {name} encoder", _rel(png, root)))
        lines.append("")
    return lines


def _result_cell(result: dict, primary: str | None) -> tuple[str, dict | None]:
    """'value [CI]; test value [CI]' of a metrics.json entry holding cv/test (the CNN's or the
    probe's), and its cv entry for the chart."""
    entry = (result.get("cv") or {}).get("metrics", {}).get(primary)
    test = (result.get("test") or {}).get("metrics", {}).get(primary)
    cell = _fmt_metric(entry) + (f"; test {_fmt_metric(test)}" if test else "")
    return cell, entry if entry and entry.get("value") is not None else None


def _probe_cell(metrics: dict) -> tuple[str, dict | None]:
    probe = metrics.get("probe")
    if not probe:
        return "not run", None
    if probe.get("error"):
        return f"failed: {probe['error'][:80]}", None
    cell, entry = _result_cell(probe, metrics.get("primary_metric"))
    return f"{cell} ({probe.get('model', '?')})", entry


def downstream_section(models: dict[tuple[str, str], Path], targets: list[Any], encoders: list[str],
                       report_dir: Path, root: Path) -> list[str]:
    lines = ["## Slide-level models", "",
             "Cross-validated (out-of-fold) results with bootstrap 95 % confidence intervals in brackets; "
             "test-set results where a test split was held out.", ""]
    header = ["encoder"] + [f"{t.name} ({METRIC_NAMES.get(_primary(models, t.name, encoders) or '', 'metric')})"
                            for t in targets]
    rows: list[list[str]] = []
    probe_rows: list[list[str]] = []
    chart: dict[str, dict[str, Any]] = {}
    probe_chart: dict[str, dict[str, Any]] = {}
    for enc in encoders:
        row, probe_row = [enc], [enc]
        for t in targets:
            metrics = _read_json(models[(enc, t.name)] / "metrics.json") or {}
            cell, entry = _result_cell(metrics, metrics.get("primary_metric"))
            probe_cell, probe_entry = _probe_cell(metrics)
            row.append(cell)
            probe_row.append(probe_cell)
            if entry:
                chart.setdefault(t.name, {})[enc] = entry
            if probe_entry:
                probe_chart.setdefault(t.name, {})[enc] = probe_entry
        rows.append(row)
        probe_rows.append(probe_row)
    lines += table(header, rows) + [""]
    if probe_chart:
        lines += ["Linear probe on the same folds:", "", *table(header, probe_rows), "", PROBE_NOTE, ""]
    if chart:
        png = plot_comparison(chart, {t.name: METRIC_NAMES.get(_primary(models, t.name, encoders) or "", "")
                                      for t in targets}, report_dir / "comparison.png", probe=probe_chart)
        lines += [image("downstream metric by encoder and target", _rel(png, root)), ""]
    for t in targets:
        lines += [f"### {t.name}", ""]
        for enc in encoders:
            metrics = _read_json(models[(enc, t.name)] / "metrics.json") or {}
            plots = (metrics.get("cv") or {}).get("plots", {})
            pics = [v for k, v in plots.items() if isinstance(v, str) and v.endswith(".png")]
            for pic in pics:
                lines.append(image(f"{t.name}, {enc} encoder", _rel(models[(enc, t.name)] / pic, root)))
            p = plots.get("logrank_p")
            probe_p = ((metrics.get("probe") or {}).get("cv") or {}).get("logrank_p")
            if p is not None or probe_p is not None:
                said = [f"{metrics.get('model', 'model')} {p:.3g}" if p is not None else None,
                        f"linear probe {probe_p:.3g}" if probe_p is not None else None]
                lines.append(f"\n{enc}: log-rank p of the predicted-risk groups: "
                             + ", ".join(x for x in said if x))
        lines.append("")
    return lines


def _primary(models: dict[tuple[str, str], Path], target: str, encoders: list[str]) -> str | None:
    for enc in encoders:
        metrics = _read_json(models[(enc, target)] / "metrics.json")
        if metrics and metrics.get("primary_metric"):
            return metrics["primary_metric"]
    return None


def write_study_report(cfg: Any, layout: Any, steps: list[Any], inputs: dict[str, Any]) -> Path:
    root = layout.root
    report_dir = layout.report_dir
    report_dir.mkdir(parents=True, exist_ok=True)
    encoders = list(inputs["encoders"])
    grids = {name: layout.grids(name) for name in encoders}
    models = {(enc, t.name): layout.model(enc, t.name) for enc in encoders for t in cfg.targets}

    lines = [f"# {cfg.title}", "",
             f"Made by `nic pipeline` on {time.strftime('%Y-%m-%d %H:%M')}; artifacts under `{root}`. "
             "Re-running the same command skips every finished step.", ""]
    lines += downstream_section(models, cfg.targets, encoders, report_dir, root)
    lines += encoder_section(inputs["encoders"], inputs.get("encoder_overrides"))
    lines += compression_section(grids)
    lines += cohort_section(Path(inputs["labels"]), layout.cohort if cfg.synth is not None else None)
    lines += grid_pictures(grids, report_dir, root, cfg.report_slides)
    steps_rows = [[str(i), s.label, f"nic {s.stage}", f"{s.seconds:.0f} s",
                   "done" if s.code == 0 else f"exit {s.code}"] for i, s in enumerate(steps, 1)]
    lines += ["## Steps", "", *table(["#", "step", "command", "time", "result"], steps_rows), "",
              "Configuration: `pipeline_config.yaml` (every default filled in); each stage's own config is "
              "saved in its output folder.", ""]
    path = layout.report
    write_bytes_atomic(path, "\n".join(lines).encode())
    return path
