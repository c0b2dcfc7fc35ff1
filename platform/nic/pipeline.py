"""`nic pipeline`: the whole study, stage after stage, from one config.

Stages meet only at their artifacts, so the pipeline is a list of stage configs with the paths
wired together. Every config is built before anything runs (a typo in the last stage fails at
once), and every stage skips the work it finds complete, so a re-run resumes where it stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nic.config.base import ConfigError, dump_config
from nic.config.compress import CompressConfig
from nic.config.downstream import TrainDownstreamConfig
from nic.config.encoder import BUILTIN_KINDS, TrainEncoderConfig
from nic.config.pipeline import PipelineConfig, stage_config
from nic.config.synth import SynthConfig
from nic.logs import stage_logger
from nic.stage_io import stage_storage
from nic.storage import display

log = stage_logger("pipeline")


@dataclass
class Step:
    """One stage run of the pipeline."""

    label: str
    stage: str
    config: Any
    run: Callable[[Any], int]
    outputs: dict[str, Path] = field(default_factory=dict)
    code: int | None = None
    seconds: float = 0.0


@dataclass
class Layout:
    """Where every artifact of a pipeline run lives."""

    root: Path

    @property
    def cohort(self) -> Path:
        return self.root / "cohort"

    def encoder(self, name: str) -> Path:
        return self.root / "encoders" / name

    def grids(self, name: str) -> Path:
        return self.root / "grids" / name

    def model(self, encoder: str, target: str) -> Path:
        return self.root / "models" / encoder / target

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    @property
    def report(self) -> Path:
        return self.root / "report.md"


def _runner(module: str, name: str) -> Callable[[Any], int]:
    """Stage entry points are imported when they run, so planning stays fast."""

    def run(config: Any) -> int:
        import importlib

        return int(getattr(importlib.import_module(module), name)(config) or 0)

    return run


def plan_pipeline(cfg: PipelineConfig) -> tuple[Layout, list[Step], dict[str, Any]]:
    """Every stage config of the study, validated; plus where the cohort's inputs are."""
    layout = Layout(Path(cfg.out))
    common = {"ray": cfg.ray.model_dump(), "verbose": cfg.verbose}
    steps: list[Step] = []

    if cfg.synth is not None:
        synth = stage_config(SynthConfig, {**common, "out": str(layout.cohort)}, cfg.synth, source="pipeline: synth")
        steps.append(Step("synthetic cohort", "synth", synth, _runner("nic.synth.stage", "run_synth"),
                          {"cohort": layout.cohort}))
        inputs = {"slides": [str(layout.cohort / "slides")], "labels": layout.cohort / "labels.csv",
                  "tasks": layout.cohort / "tasks.yaml"}
    else:
        assert cfg.data is not None
        inputs = {"slides": cfg.data.slides, "labels": cfg.data.labels, "tasks": cfg.data.tasks}

    encoder_refs: dict[str, str] = {}
    own_settings: dict[str, dict[str, Any]] = {}  # your own encoders: their compress keys
    for run in cfg.encoders:
        if run.kind == "external":  # your own encoder: nothing to train, compressed as it is
            encoder_refs[run.name] = str(run.path)
            own_settings[run.name] = run.settings
            continue
        if run.kind in BUILTIN_KINDS and not run.settings:
            encoder_refs[run.name] = run.kind  # built-ins need no training and no file
            continue
        if inputs["tasks"] is None and run.kind not in BUILTIN_KINDS:
            raise ConfigError(f"pipeline: encoder '{run.name}' ({run.kind}) needs patch tasks: set data.tasks")
        wired = {**common, "kind": run.kind, "out": str(layout.encoder(run.name)), "name": run.name}
        if inputs["tasks"] is not None:
            wired["tasks"] = str(inputs["tasks"])
        enc = stage_config(TrainEncoderConfig, wired, cfg.encoder, run.settings,
                           source=f"pipeline: encoder + encoders[{run.name}].settings")
        steps.append(Step(f"encoder {run.name}", "train-encoder", enc,
                          _runner("nic.train.encoder_stage", "run_train_encoder"),
                          {"encoder": layout.encoder(run.name)}))
        encoder_refs[run.name] = str(layout.encoder(run.name))

    overrides: dict[str, dict[str, Any]] = {}
    for name, ref in encoder_refs.items():
        comp = stage_config(CompressConfig, {**common, "slides": inputs["slides"], "encoder": ref,
                                             "out": str(layout.grids(name))},
                            cfg.compress, own_settings.get(name, {}),
                            source="pipeline: compress" + (f" + encoders[{name}].settings" if name in own_settings else ""))
        if comp.encoder_overrides():
            overrides[name] = comp.encoder_overrides()
        steps.append(Step(f"compress with {name}", "compress", comp, _runner("nic.compress.stage", "run_compress"),
                          {"grids": layout.grids(name)}))

    for name in encoder_refs:
        for target in cfg.targets:
            wired = {**common, "grids": str(layout.grids(name)), "labels": str(inputs["labels"]),
                     "out": str(layout.model(name, target.name)), "kind": target.kind}
            if target.target is not None:
                wired["target"] = target.target
            down = stage_config(TrainDownstreamConfig, wired, cfg.downstream, target.settings,
                                source=f"pipeline: downstream + targets[{target.name}].settings")
            steps.append(Step(f"{target.name} from {name} grids", "train-downstream", down,
                              _runner("nic.train.downstream_stage", "run_train_downstream"),
                              {"model": layout.model(name, target.name)}))
    return layout, steps, {**inputs, "encoders": encoder_refs, "encoder_overrides": overrides}


@stage_storage(lazy=("grids/*/tiles",))  # each compress step decides from its manifest (issue 16 item 6)
def run_pipeline(cfg: PipelineConfig) -> int:
    from nic.artifacts import write_bytes_atomic
    from nic.report.study import write_study_report
    from nic.runtime import connect

    layout, steps, inputs = plan_pipeline(cfg)
    layout.root.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(layout.root / "pipeline_config.yaml", dump_config(cfg).encode())
    connect(cfg.ray, cfg.verbose)
    start = time.monotonic()
    log.info(f"[pipeline] {len(steps)} steps; artifacts under {display(layout.root)}")
    for number, step in enumerate(steps, 1):
        log.info(f"[pipeline] step {number}/{len(steps)}: {step.label} (nic {step.stage})")
        began = time.monotonic()
        step.code = step.run(step.config)
        step.seconds = time.monotonic() - began
        log.info(f"[pipeline] step {number}/{len(steps)}: {step.label} finished in {step.seconds:.0f} s (exit {step.code})")
        if step.code != 0:
            log.error(f"[pipeline] stopping: nic {step.stage} failed (exit {step.code}); fix it and re-run, finished steps are kept")
            return step.code
    report = write_study_report(cfg, layout, steps, inputs)
    log.info(f"[pipeline] all {len(steps)} steps done in {(time.monotonic() - start) / 60:.1f} min")
    log.info(f"[pipeline] report: {display(report.resolve())}")
    return 0

