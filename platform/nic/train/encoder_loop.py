"""The encoder training loop on Ray Train (Train V2): one function per worker, one driver call.

Each worker gets the patch arrays from the object store (read once by the driver), takes its
stride of every epoch's shared, seeded sample order, and trains the DDP-wrapped objective.
Every epoch ends with a validation over the whole validation set (sharded, then gathered), an
early-stopping decision that all workers compute identically, and `ray.train.report` with a
checkpoint (model, optimisers, early-stopping state, the best encoder so far, the history).

Resuming needs nothing from the caller: Ray Train V2 keeps a snapshot of the reported
checkpoints under storage_path/run_name, so a restarted worker group (FailureConfig) or a new
driver run with the same storage path and run name gets the latest checkpoint from
`ray.train.get_checkpoint()` and continues with the next epoch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from nic.storage import display, ray_storage, uri_for
from nic.train.common import (
    EarlyStopping,
    Stopwatch,
    TrainSession,
    any_worker,
    broadcast_buffers,
    cpu_copy,
    epoch_line,
    gather_columns,
    load_checkpoint,
    load_state_dicts,
    mean_over_workers,
    report_epoch,
    send_progress,
    state_dicts,
    unwrap_model,
)

if TYPE_CHECKING:
    from nic.encoders.objectives import Objective


STAGE = "train-encoder"
EpochHook = Callable[[int, int], None]


@dataclass
class LoopSettings:
    """Everything a worker needs besides the data: plain values, cheap to ship to every worker."""

    kind: str
    architecture: str
    embedding_dim: int
    tile_px: int
    objective: dict  # asdict(ObjectiveSpec)
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    patience: int
    seed: int
    augment: dict  # AugmentOptions.model_dump()
    samples_per_task: int | None = None
    max_steps_per_epoch: int | None = None
    max_minutes_per_epoch: float | None = None
    gan_lr_factor: float = 1.0
    lr_factor: float = 0.3
    lr_patience: int = 1
    pool: str | None = None  # how the trunk pools its last map; None: the architecture's own


def _objective_spec(d: dict):
    from nic.encoders.objectives import ObjectiveSpec, TaskHeadSpec

    d = dict(d)
    d["tasks"] = [TaskHeadSpec(**t) for t in d.get("tasks", [])]
    return ObjectiveSpec(**d)


def _views(x: torch.Tensor, augment: Callable[[torch.Tensor], torch.Tensor], num_views: int) -> torch.Tensor:
    return augment(x) if num_views == 1 else torch.cat([augment(x) for _ in range(num_views)])


def _repeat(t: torch.Tensor, num_views: int) -> torch.Tensor:
    return t if num_views == 1 else t.repeat(num_views)


def dense_targets(data: dict[str, np.ndarray], split: str, idx: np.ndarray, device: torch.device) -> torch.Tensor:
    """(B, 2, P, P) int16 per-pixel targets of a batch (class or instance id, nucleus type);
    -1 everywhere for samples of patch tasks (they carry no mask)."""
    rows = data[f"{split}_dense_index"][idx]
    masks = data[f"{split}_masks"]
    out = np.full((len(idx), 2, *masks.shape[1:]), -1, np.int16)
    has = rows >= 0
    out[has, 0] = masks[rows[has]]
    out[has, 1] = data[f"{split}_types"][rows[has]]
    return torch.as_tensor(out, device=device)


def train_encoder_loop(config: dict) -> None:
    """`train_loop_per_worker` of the encoder TorchTrainer."""
    run = _EncoderRun(config)
    run.resume()
    run.prepare()
    for epoch in range(run.start_epoch, run.s.epochs + 1):
        if run.hook is not None:
            run.hook(epoch, run.rank)
        # Dropout, VAE noise, BiGAN z: per worker, and seeded per epoch (like the sample order and the
        # augmentation), so a run resumed from a checkpoint draws what an uninterrupted run draws.
        # A SeedSequence of (seed, rank, epoch): no two workers or epochs share a stream.
        torch.manual_seed(int(np.random.SeedSequence([run.s.seed, run.rank, epoch]).generate_state(1)[0]))
        clock = Stopwatch()
        train_metrics, steps = run.train_epoch(epoch, clock)
        val_metrics = run.validate()
        if run.end_epoch(epoch, clock, steps, train_metrics, val_metrics):
            break


class _EncoderRun:
    """One worker's encoder training, one method per step; `train_encoder_loop` calls them in a
    fixed order. The order is part of the result: the objective's initialisation, each epoch's
    seed and the augmenters draw random numbers, so the same steps in the same order are what
    makes a run repeat bit for bit and a resumed run continue as an uninterrupted one would."""

    def __init__(self, config: dict) -> None:
        """Settings, data, and the objective with its optimisers, schedulers and patience:
        everything a checkpoint restores into."""
        import ray

        from nic.train.determinism import make_deterministic

        self.s = s = LoopSettings(**config["settings"])
        self.hook: EpochHook | None = config.get("epoch_hook")
        self.progress = config.get("progress")
        self.session = TrainSession()
        self.rank, self.world = self.session.rank, self.session.world
        self.device = self.session.device()
        # Same config, same machine, same weights: a fixed thread count and deterministic kernels.
        make_deterministic(config.get("cpus_per_worker"), self.device)
        self.data = ray.get(config["data"])
        self.spec = _objective_spec(s.objective)
        self.objective = self._build_objective()
        # GANs train more stably with a short first-moment memory (beta1 = 0.5, as in DCGAN/BiGAN).
        betas = (0.5, 0.999) if len(self.objective.phases) > 1 else (0.9, 0.999)
        self.optimizers = {
            phase: torch.optim.Adam(self.objective.phase_parameters(phase), betas=betas, weight_decay=s.weight_decay,
                                    lr=s.lr * (s.gan_lr_factor if phase == "d" else 1.0))
            for phase in self.objective.phases
        }
        self.early = EarlyStopping(s.patience)
        # Lower the learning rate when validation stops improving (objectives whose validation loss
        # means something only: not the GAN).
        self.schedulers = {
            phase: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=s.lr_factor, patience=s.lr_patience)
            for phase, opt in self.optimizers.items()
        } if self.objective.early_stopping and s.lr_factor < 1 else {}
        self.history: list[dict] = []
        self.best_encoder: dict | None = None
        self.best_extra: dict = {}
        self.best_metrics: dict = {}
        self.start_epoch = 1
        self.resumed_from: int | None = None

    def _build_objective(self) -> Objective:
        """The encoder inside its objective, on this worker's device, initialised from the seed
        alone (a forked RNG: identical on every worker, and the global stream is left as it was)."""
        from nic.encoders.encoder import build_encoder
        from nic.encoders.objectives import build_objective

        s = self.s
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s.seed)  # identical initialisation on every worker (DDP also broadcasts it)
            objective = build_objective(self.spec, build_encoder(s.architecture, s.embedding_dim, s.tile_px,
                                                                 pool=s.pool))
        objective.to(self.device)
        return objective

    def _core(self) -> Objective:
        """The objective inside DDP's wrapper (or the objective itself on one worker)."""
        return cast("Objective", unwrap_model(self.model))

    def resume(self) -> None:
        """Continue after the latest checkpoint's epoch, if the run has one: weights, optimisers,
        schedulers, patience, history and the best encoder so far. A run that stopped early has
        nothing left to do."""
        checkpoint = self.session.checkpoint()
        if checkpoint is None:
            return
        state = load_checkpoint(checkpoint)
        load_state_dicts({"objective": self.objective}, state)
        load_state_dicts(self.optimizers, state["optimizers"])
        load_state_dicts({"early": self.early}, state)
        load_state_dicts(self.schedulers, state.get("schedulers", {}), missing_ok=True)
        self.history, self.best_encoder, self.best_metrics = state["history"], state["best_encoder"], state["best_metrics"]
        self.best_extra = state["best_extra"]
        self.start_epoch = state["epoch"] + 1
        self.resumed_from = state["epoch"]
        if state.get("stopped"):
            self.start_epoch = self.s.epochs + 1  # early-stopped before: nothing left to do

    def prepare(self) -> None:
        """DDP-wrap the objective and set up what every epoch reads: the sampler, the augmentation
        options, the number of views, whether dense targets go along."""
        from nic.config.encoder import AugmentOptions
        from nic.patches.sampling import MixedTaskSampler

        s, data = self.s, self.data
        self.model = self.session.prepare(self.objective, find_unused_parameters=True)
        self.sampler = MixedTaskSampler(data["train_tasks"], s.samples_per_task, s.seed, self.rank, self.world)
        self.augment_options = AugmentOptions(**s.augment)
        self.crop = min(self.augment_options.crop_scale, 0.5) if self.spec.kind == "contrastive" else None
        self.views = self.objective.num_views
        self.n_val = len(data["val_tasks"])
        # dense tasks (segmentation, nuclei): their samples' masks go to the objectives that use them
        self.dense = bool(getattr(self.objective, "uses_masks", False)) and "train_dense_index" in data
        if self.rank == 0 and self.resumed_from is not None and self.start_epoch <= s.epochs:
            send_progress(self.progress, f"[{STAGE}] resuming from the epoch-{self.resumed_from} checkpoint")

    def train_epoch(self, epoch: int, clock: Stopwatch) -> tuple[dict[str, float], int]:
        """This worker's share of the epoch's seeded sample order, every phase's optimiser stepping
        on each batch, until the order or an optional step or time cap runs out; returns the loss
        averaged over steps and workers, and the number of steps."""
        from nic.patches.augment import Augmenter

        s, device = self.s, self.device
        augment = Augmenter(self.augment_options, device, seed=s.seed * 100003 + epoch * 101 + self.rank,
                            crop_scale=self.crop)
        self.model.train()
        sums: dict[str, float] = {}
        steps = 0
        for idx in self.sampler.batches(epoch, s.batch_size):
            if s.max_steps_per_epoch is not None and steps >= s.max_steps_per_epoch:
                break
            if s.max_minutes_per_epoch is not None and any_worker(clock.over(s.max_minutes_per_epoch), device):
                break
            self._train_step(idx, augment, sums)
            steps += 1
        train_metrics = mean_over_workers({k: v / max(steps, 1) for k, v in sums.items()}, device)
        if len(self.optimizers) > 1:
            train_metrics.setdefault("loss", sum(v for k, v in train_metrics.items() if k.startswith("loss/")))
        return train_metrics, steps

    def _train_step(self, idx: np.ndarray, augment: Callable[..., Any], sums: dict[str, float]) -> None:
        """One batch: augmented views (dense targets transformed with their tiles), then one step
        of each phase's optimiser; adds the batch's losses to `sums`."""
        from nic.patches.augment import to_float01

        data, device, views = self.data, self.device, self.views
        dense_kw: dict[str, torch.Tensor] = {}
        if self.dense:  # per-pixel targets get the same geometric augmentation as their tiles
            x, dense_kw["masks"] = augment(to_float01(data["train_images"][idx], device),
                                           dense_targets(data, "train", idx, device))
        else:
            x = _views(to_float01(data["train_images"][idx], device), augment, views)
        t = _repeat(torch.as_tensor(data["train_tasks"][idx], device=device), views)
        y = _repeat(torch.as_tensor(data["train_labels"][idx], device=device), views)
        for phase, opt in self.optimizers.items():
            out = self.model(x, t, y, phase=phase, **dense_kw)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            parts = out if len(self.optimizers) == 1 else {f"loss/{phase}": out["loss"]}
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach())

    def validate(self) -> dict[str, float]:
        """Validation over the whole validation set, sharded across workers then gathered, with
        fixed per-rank seeds for the views and the objective's noise, so every epoch is judged on
        the same draws and every worker computes the same metrics."""
        from nic.patches.augment import Augmenter, to_float01
        from nic.patches.sampling import eval_batches

        s, data, device, views = self.s, self.data, self.device, self.views
        core = self._core()
        broadcast_buffers(core)
        core.eval()
        val_augment = Augmenter(self.augment_options, device, seed=s.seed + 17 + self.rank, crop_scale=self.crop)
        generator = torch.Generator(device=device)
        generator.manual_seed(s.seed + 31 + self.rank)
        columns: dict[str, list[np.ndarray]] = {}
        with torch.no_grad():
            for idx in eval_batches(self.n_val, s.batch_size, self.rank, self.world):
                x = to_float01(data["val_images"][idx], device)
                if views > 1:
                    x = _views(x, val_augment, views)
                t = _repeat(torch.as_tensor(data["val_tasks"][idx], device=device), views)
                y = _repeat(torch.as_tensor(data["val_labels"][idx], device=device), views)
                val_kw = {"masks": dense_targets(data, "val", idx, device)} if self.dense else {}
                for key, value in core.validation_step(x, t, y, generator, **val_kw).items():
                    columns.setdefault(key, []).append(value)
        local = {k: np.concatenate(v) for k, v in columns.items()}
        gathered = gather_columns(local)
        return core.validation_metrics(gathered) if gathered else {"val_loss": float("nan")}

    def end_epoch(self, epoch: int, clock: Stopwatch, steps: int, train_metrics: dict[str, float],
                  val_metrics: dict[str, float]) -> bool:
        """Patience, LR schedule and the best encoder so far, then the epoch's history entry and
        report (rank 0: its progress line and a checkpoint); True when training should stop."""
        s, objective, early = self.s, self.objective, self.early
        core = self._core()
        improved = early.update(val_metrics["val_loss"], epoch) if objective.early_stopping else True
        for sched in self.schedulers.values():
            sched.step(val_metrics["val_loss"])
        if improved or self.best_encoder is None:
            self.best_encoder = cpu_copy(core.encoder.state_dict())
            self.best_extra = cpu_copy(core.extra_state())
            self.best_metrics = dict(val_metrics, epoch=epoch)
        stop = objective.early_stopping and early.should_stop
        seconds = clock.seconds()
        lr_now = self.optimizers[objective.phases[-1]].param_groups[0]["lr"]
        metrics = {"epoch": epoch, "steps": steps, "seconds": seconds, "lr": lr_now, **train_metrics, **val_metrics}
        self.history.append(metrics)

        shown = {"loss": train_metrics.get("loss", float("nan")), "val_loss": val_metrics["val_loss"]}
        shown.update({k: v for k, v in val_metrics.items() if "/" in k and not k.endswith("/loss")})
        if self.schedulers and lr_now != s.lr:
            shown["lr"] = lr_now
        note = "(best)" if improved and objective.early_stopping else ""
        if stop:
            note = f"early stop: no better val_loss for {early.patience} epochs"
        line = epoch_line(STAGE, epoch, s.epochs, shown, seconds, note)
        report_epoch(self.session, metrics, self.progress, line, lambda: self._state(epoch, stop))
        return stop

    def _state(self, epoch: int, stop: bool) -> dict:
        """The checkpoint: the objective, optimisers, schedulers and patience to resume from, and
        the best encoder with its metrics (what the driver saves when training ends)."""
        return {
            "epoch": epoch, "objective": self._core().state_dict(),
            "optimizers": state_dicts(self.optimizers), "schedulers": state_dicts(self.schedulers),
            "early": self.early.state_dict(), "history": self.history, "best_encoder": self.best_encoder,
            "best_metrics": self.best_metrics, "stopped": stop, "best_extra": self.best_extra,
        }


@dataclass
class FitResult:
    """What the driver gets back: the best encoder's weights and the run's record."""

    best_encoder: dict
    best_metrics: dict
    history: list[dict]
    extra_state: dict
    epochs_run: int
    stopped_early: bool
    run_path: Path


def fit_encoder(
    settings: LoopSettings,
    data: dict[str, np.ndarray],
    storage_path: Path,
    run_name: str,
    num_workers: int = 1,
    cpus_per_worker: int = 1,
    use_gpu: bool = False,
    max_failures: int = 1,
    epoch_hook: EpochHook | None = None,
    show_progress: bool = True,
    resource_timeout_s: float = 300.0,
) -> FitResult:
    """Run the TorchTrainer on an already connected Ray and return the best encoder's weights.

    `data` holds train_images/train_labels/train_tasks and val_* arrays (uint8 tiles (N, P, P, 3),
    float32 labels, int64 task indices). `epoch_hook(epoch, rank)` runs at the start of every
    epoch on every worker (for fault-injection tests and instrumentation).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    from nic.train.common import ProgressRelay, configure_train_polling
    from nic.train.trainer import OwnedTorchTrainer, controller_failure_limit, wait_for_resources

    configure_train_polling()
    storage_path = Path(storage_path).absolute()
    storage = ray_storage(storage_path)  # a mirror path's URI: Ray writes checkpoints there itself
    if uri_for(storage_path) is None:
        storage_path.mkdir(parents=True, exist_ok=True)
    per_worker = {"CPU": float(cpus_per_worker), **({"GPU": 1.0} if use_gpu else {})}
    wait_for_resources(num_workers, per_worker, resource_timeout_s, f"encoder training {run_name}")
    data_ref = ray.put(data)
    loop_config: dict[str, Any] = {"settings": asdict(settings), "data": data_ref, "epoch_hook": epoch_hook,
                                   "cpus_per_worker": cpus_per_worker}
    scaling = ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                            resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})})
    run_config = RunConfig(
        name=run_name, storage_path=storage,
        # Ray Train v2's FailureConfig: ray.train exports v2 at run time, mypy reads v1's
        failure_config=FailureConfig(max_failures=max_failures,  # type: ignore[call-arg]
                                     controller_failure_limit=controller_failure_limit(resource_timeout_s)),
        checkpoint_config=CheckpointConfig(num_to_keep=2),
    )
    relay = ProgressRelay() if show_progress else None
    loop_config["progress"] = relay.queue if relay else None
    trainer = OwnedTorchTrainer(train_encoder_loop, train_loop_config=loop_config, scaling_config=scaling,
                           run_config=run_config)
    if relay:
        with relay:
            result = trainer.fit()
    else:
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {display(storage_path / run_name)} reported no checkpoint")
    state = load_checkpoint(result.checkpoint)
    return FitResult(
        best_encoder=state["best_encoder"], best_metrics=state["best_metrics"], history=state["history"],
        extra_state=state.get("best_extra") or {}, epochs_run=state["epoch"],
        stopped_early=bool(state.get("stopped")), run_path=storage_path / run_name,
    )
