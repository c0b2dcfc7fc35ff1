"""`nic tune`: a Ray Tune search over MTL task subsets and hyperparameters.

Writes a trial table (trials.parquet and trials.csv), best_config.yaml and the plot the paper is
about: the downstream metric against the number of MTL tasks, with its Spearman correlation.
An interrupted search resumes with `Tuner.restore` when the same command is run again.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from nic.artifacts import write_bytes_atomic
from nic.config.base import ConfigError, dump_config
from nic.config.tune import TuneConfig
from nic.logs import stage_logger
from nic.runtime import connect
from nic.stage_io import stage_storage
from nic.storage import ray_storage, uri_for
from nic.tune.results import trial_table, write_results
from nic.tune.space import param_space
from nic.tune.trial import METRIC, run_trial, trial_configs

EXPERIMENT = "search"
TRIAL_MEMORY_BYTES = 2**20


log = stage_logger("tune")


def _task_names(tasks_yaml: Path) -> list[str]:
    from nic.patches import load_tasks

    return [t.name for t in load_tasks(tasks_yaml)]


def _static(cfg: TuneConfig) -> dict:
    """What every trial shares, as plain data (trials run in other processes)."""
    # Trials run in their own working directories: every path must be absolute.
    slides = [str(Path(s).expanduser().absolute()) for s in cfg.slides]
    return {"tasks": str(Path(cfg.tasks).resolve()), "slides": slides, "labels": str(Path(cfg.labels).resolve()),
            "kind": cfg.kind, "target": cfg.target, "out": str(Path(cfg.out).resolve()),
            "encoder": cfg.encoder, "compress": cfg.compress, "downstream": cfg.downstream,
            "trial_metric": cfg.trial_metric,
            "ray": cfg.ray.model_dump()}


def check_sections(cfg: TuneConfig, tasks: list[str] | None = None) -> None:
    """Validate the encoder, compress and downstream sections as a trial would build them
    (ConfigError naming the section), without reading tasks.yaml unless `tasks` is not given."""
    trial_configs({"tasks": tasks or ["any"]}, _static(cfg), Path(cfg.out).resolve() / "trials" / "check")


def check_labels_cover_slides(cfg: TuneConfig) -> None:
    """Refuse, before any encoder is trained, a search whose every trial would stop at the
    downstream stage: labelled slides outside the trials' slide set are an error there unless
    `downstream.missing_grids: drop` says to train without them."""
    from nic.downstream.labels import read_table
    from nic.slides.inputs import expand_slide_inputs

    if cfg.downstream.get("missing_grids", "error") != "error" or uri_for(Path(cfg.labels)) is not None:
        return
    frame = read_table(cfg.labels)
    if "slide_id" not in frame:
        return  # the downstream stage's own label checks name this problem
    slides = {s.slide_id for s in expand_slide_inputs(list(cfg.slides)) if s.error is None}
    outside = sorted(set(frame["slide_id"].astype(str)) - slides)
    if outside:
        shown = ", ".join(outside[:5]) + (" ..." if len(outside) > 5 else "")
        raise ConfigError(
            f"{cfg.labels}: {len(outside)} labelled slide(s) are not among the trials' slides ({shown}); "
            "every trial's downstream stage would refuse them: set downstream.missing_grids: drop to train "
            "on the labelled slides that are compressed, or list those slides too")


@stage_storage
def run_tune(cfg: TuneConfig) -> int:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from nic.tune.progress import TrialProgress

    out = Path(cfg.out).resolve()
    names = _task_names(cfg.tasks)
    if cfg.min_tasks > len(names):
        raise ConfigError(f"min_tasks = {cfg.min_tasks} but {cfg.tasks} has only {len(names)} tasks")
    static = _static(cfg)
    check_sections(cfg, names[:1])  # every stage section, once, before any trial starts
    check_labels_cover_slides(cfg)
    out.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out / "tune_config.yaml", dump_config(cfg).encode())

    connect(cfg.ray, cfg.verbose)
    space = param_space(cfg, names)
    trials = len(space["tasks"]["grid_search"])
    folds = int(cfg.downstream.get("folds", 5))
    # Ray Tune needs a non-empty reservation per trial; a MiB of memory stands in for "nothing".
    reservation: dict[str, float] = {"cpu": cfg.trial_cpus} if cfg.trial_cpus > 0 else {"cpu": 0, "memory": TRIAL_MEMORY_BYTES}
    trainable = tune.with_resources(tune.with_parameters(run_trial, static=static), reservation)
    scheduler = None
    if cfg.asha:
        # Rungs are reports: one per finished fold plus the final pooled metric.
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=folds + 1, grace_period=cfg.grace_folds,
                                  reduction_factor=cfg.reduction_factor)
    mode = "max"  # every primary metric here (Spearman, ROC AUC, C-index) is better when higher
    storage = ray_storage(out / "ray")  # a mirror path's URI: Tune syncs there from every node
    experiment = f"{storage}/{EXPERIMENT}"
    if tune.Tuner.can_restore(experiment):
        log.info(f"[tune] restoring the search in {experiment}: finished trials are kept, unfinished ones resume")
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_errored=True,
                                   restart_errored=False)
    else:
        log.info(f"[tune] {trials} trials over task subsets of {names}; up to {cfg.max_concurrent_trials} at once")
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(metric=METRIC, mode=mode, scheduler=scheduler, num_samples=1,
                                        max_concurrent_trials=cfg.max_concurrent_trials),
            run_config=tune.RunConfig(name=EXPERIMENT, storage_path=storage,
                                      verbose=1 if cfg.verbose else 0,
                                      callbacks=[TrialProgress(trials, METRIC)],
                                      failure_config=tune.FailureConfig(max_failures=1)),
        )
    try:
        grid = tuner.fit()
    finally:  # trials stopped mid-fold (ASHA) leave their Train controllers' placement groups
        from nic.train.trainer import remove_orphaned_placement_groups

        remove_orphaned_placement_groups()
    frame = trial_table(grid, names)
    paths = write_results(frame, out, cfg, mode)
    best = frame[frame["complete"]].sort_values(METRIC, ascending=False)
    if len(best):
        top = best.iloc[0]
        log.info(f"[tune] best: tasks {top['tasks']} -> {METRIC} {top[METRIC]:.3f}")
        write_bytes_atomic(out / "best_config.yaml",
                           yaml.safe_dump({"tasks_subset": top["tasks"].split(","), **top["params"],
                                           METRIC: float(top[METRIC]), "trial_id": top["trial_id"]},
                                          sort_keys=False).encode())
    log.info(f"[tune] trial table: {paths['parquet']}, plot: {paths['plot']}")
    errored = int((frame["status"] == "ERROR").sum())
    if errored:
        log.warning(f"[tune] {errored} trial(s) errored; their errors are in {experiment}")
    return 0 if len(best) else 1
