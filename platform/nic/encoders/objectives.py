"""Training objectives: supervised multitask (MTL) and NIC's unsupervised baselines.

Each objective is one `nn.Module` that owns the encoder plus whatever else its loss needs (task
heads, a decoder, a generator and discriminator, a projection head), so that DDP wraps a single
module and every gradient goes through its `forward`. An objective has one or more *phases*,
each with its own optimiser over its own parameters (a GAN alternates discriminator and
encoder/generator steps; everything else has one phase).

Inputs are float batches in [0, 1], (N, 3, P, P), already augmented by the training loop.
Validation returns per-sample columns that the loop gathers across workers before computing
metrics, so metrics are exact for the whole validation set whatever the number of workers.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nic.encoders.encoder import PatchEncoder


@dataclass
class TaskHeadSpec:
    """What a head needs to know about its task (regression targets are standardised)."""

    name: str
    kind: str  # multiclass | binary | regression
    num_outputs: int
    weight: float = 1.0
    classes: list[str] | None = None
    target_mean: float = 0.0
    target_std: float = 1.0
    background: int | None = None  # segmentation: the class left out of the mean foreground Dice

    def to_dict(self) -> dict:
        out = dict(self.__dict__)
        if out["background"] is None:  # patch tasks: recorded as before dense tasks existed
            del out["background"]
        return out


def _pooled_target(x: torch.Tensor, size: int = 64) -> torch.Tensor:
    """The tile as NIC's reference trunk sees it: average-pooled to size x size, in [-1, 1]."""
    x = x * 2 - 1
    if x.shape[-1] == size:
        return x
    if x.shape[-1] % size == 0:
        return F.avg_pool2d(x, x.shape[-1] // size)
    return F.adaptive_avg_pool2d(x, size)


class Objective(nn.Module, abc.ABC):
    """Base: an encoder and a loss. Subclasses define `forward` and the validation columns."""

    kind = "base"
    phases: tuple[str, ...] = ("main",)
    num_views = 1
    early_stopping = True

    def __init__(self, encoder: PatchEncoder):
        super().__init__()
        self.encoder = encoder

    def phase_parameters(self, phase: str) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    @abc.abstractmethod
    def forward(self, x: torch.Tensor, task_ids: torch.Tensor, labels: torch.Tensor,
                phase: str = "main") -> dict[str, torch.Tensor]:
        """Losses of one training batch (a `loss` key is what is optimised)."""

    @abc.abstractmethod
    def validation_step(self, x: torch.Tensor, task_ids: torch.Tensor, labels: torch.Tensor,
                        generator: torch.Generator | None = None) -> dict[str, np.ndarray]:
        """Per-sample validation columns, gathered over workers before validation_metrics."""

    def validation_metrics(self, columns: dict[str, np.ndarray]) -> dict[str, float]:
        return {"val_loss": float(np.mean(columns["loss"]))}

    def extra_state(self) -> dict:
        """Whatever besides the encoder is worth keeping with the artifact (e.g. MTL heads)."""
        return {}


# --------------------------------------------------------------------------------------------
# Supervised multitask
# --------------------------------------------------------------------------------------------


def _make_head(embedding_dim: int, outputs: int, hidden: int) -> nn.Module:
    if hidden <= 0:
        return nn.Linear(embedding_dim, outputs)
    return nn.Sequential(nn.Linear(embedding_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, outputs))


def task_loss(spec: TaskHeadSpec, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy (multiclass), binary cross-entropy on one logit, or MSE on standardised targets."""
    if spec.kind == "multiclass":
        return F.cross_entropy(logits, labels.long(), reduction=reduction)
    if spec.kind == "binary":
        return F.binary_cross_entropy_with_logits(logits[:, 0], labels.float(), reduction=reduction)
    target = (labels.float() - spec.target_mean) / spec.target_std
    return F.mse_loss(logits[:, 0], target, reduction=reduction)


def masked_multitask_loss(
    embeddings: torch.Tensor,
    heads: nn.ModuleDict,
    specs: list[TaskHeadSpec],
    task_ids: torch.Tensor,
    labels: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum over the tasks present in the batch of weight x mean loss of that task's samples.

    Each sample carries the label of its own task only, so each head is evaluated on its own
    task's rows only: a task absent from the batch contributes nothing, and its head gets no
    gradient (its parameters are not in the graph).
    """
    total = embeddings.new_zeros(())
    parts: dict[str, torch.Tensor] = {}
    for k, spec in enumerate(specs):
        mask = task_ids == k
        if spec.name not in heads or not bool(mask.any()):  # dense tasks have decoders, not heads
            continue
        loss = task_loss(spec, heads[spec.name](embeddings[mask]), labels[mask])
        parts[spec.name] = loss.detach()
        total = total + spec.weight * loss
    return total, parts


class MultiTaskObjective(Objective):
    """Shared trunk, one head per patch task and one decoder per dense task (nic.encoders.dense_tasks),
    masked per-sample loss with per-task weights."""

    kind = "mtl"

    def __init__(self, encoder: PatchEncoder, tasks: list[TaskHeadSpec], head_hidden: int = 0):
        from nic.encoders.dense_tasks import build_decoders, is_dense

        super().__init__(encoder)
        if not tasks:
            raise ValueError("multitask training needs at least one task")
        self.tasks = tasks
        self.head_hidden = head_hidden
        self.heads = nn.ModuleDict(
            {t.name: _make_head(encoder.embedding_dim, t.num_outputs, head_hidden) for t in tasks if not is_dense(t)}
        )
        self.has_dense = any(is_dense(t) for t in tasks)
        if self.has_dense:
            if not hasattr(encoder.trunk, "feature_maps"):
                raise ValueError(f"dense tasks need the reference or resnet trunk, not '{encoder.architecture}'")
            self.decoders = build_decoders(tasks, encoder.trunk.map_channels)

    @property
    def uses_masks(self) -> bool:
        """The training loop hands per-pixel targets (`masks=`) only to objectives that use them."""
        return self.has_dense

    def forward(self, x, task_ids, labels, phase="main", masks=None):
        if not self.has_dense:
            emb = self.encoder(x)
            total, parts = masked_multitask_loss(emb, self.heads, self.tasks, task_ids, labels)
        else:
            from nic.encoders.dense_tasks import masked_dense_loss

            maps, emb = self.encoder.maps_and_embedding(x)
            total, parts = masked_multitask_loss(emb, self.heads, self.tasks, task_ids, labels)
            if masks is not None:
                dense_total, dense_parts = masked_dense_loss(maps, self.decoders, self.tasks, task_ids, masks,
                                                             self.encoder.tile_px)
                total = total + dense_total
                parts.update(dense_parts)
        out = {"loss": total}
        out.update({f"loss/{name}": value for name, value in parts.items()})
        return out

    @torch.no_grad()
    def validation_step(self, x, task_ids, labels, generator=None, masks=None):
        dense_columns: dict[str, np.ndarray] = {}
        if self.has_dense:
            maps, emb = self.encoder.maps_and_embedding(x)
        else:
            emb = self.encoder(x).clone()
        loss = torch.zeros(len(x), device=x.device)
        score = torch.zeros(len(x), device=x.device)
        if self.has_dense and masks is not None:
            from nic.encoders.dense_tasks import validation_columns

            dense_columns = validation_columns(maps, self.decoders, self.tasks, task_ids, masks,
                                               self.encoder.tile_px, loss)
        for k, spec in enumerate(self.tasks):
            mask = task_ids == k
            if spec.name not in self.heads or not bool(mask.any()):
                continue
            logits = self.heads[spec.name](emb[mask])
            loss[mask] = task_loss(spec, logits, labels[mask], reduction="none")
            if spec.kind == "multiclass":
                score[mask] = logits.argmax(dim=1).float()
            elif spec.kind == "binary":
                score[mask] = torch.sigmoid(logits[:, 0])
            else:
                score[mask] = logits[:, 0] * spec.target_std + spec.target_mean
        return {"task": task_ids.cpu().numpy(), "label": labels.cpu().numpy(),
                "loss": loss.cpu().numpy(), "score": score.cpu().numpy(), **dense_columns}

    def validation_metrics(self, columns):
        metrics = multitask_metrics(self.tasks, columns)
        if self.has_dense and "dense_dice" in columns:
            from nic.encoders.dense_tasks import dense_metrics

            dense = dense_metrics(self.tasks, columns)
            # the weighted sum of every task's loss, dense tasks included
            metrics["val_loss"] += sum(t.weight * dense.get(f"{t.name}/loss", 0.0) for t in self.tasks)
            val_loss = metrics.pop("val_loss")
            metrics.update(dense)
            metrics["val_loss"] = val_loss
        return metrics

    def extra_state(self) -> dict:
        state = {"heads": self.heads.state_dict(), "tasks": [t.to_dict() for t in self.tasks],
                 "head_hidden": self.head_hidden}
        if self.has_dense:
            state["decoders"] = self.decoders.state_dict()
        return state


def multitask_metrics(tasks: list[TaskHeadSpec], columns: dict[str, np.ndarray]) -> dict[str, float]:
    """Per task: loss, and accuracy (multiclass), ROC AUC and accuracy (binary) or MAE and R^2
    (regression: MAE in label units, R^2 comparable across tasks and with the slide-level models);
    `val_loss` is the weighted sum of task losses, the quantity training minimises."""
    from sklearn.metrics import mean_absolute_error, r2_score, roc_auc_score

    metrics: dict[str, float] = {}
    val_loss = 0.0
    for k, spec in enumerate(tasks):
        mask = columns["task"] == k
        if spec.kind in ("segmentation", "nuclei") or not mask.any():  # dense: nic.encoders.dense_tasks
            continue
        y, s = columns["label"][mask], columns["score"][mask]
        task_loss_value = float(np.mean(columns["loss"][mask]))
        metrics[f"{spec.name}/loss"] = task_loss_value
        val_loss += spec.weight * task_loss_value
        if spec.kind == "multiclass":
            metrics[f"{spec.name}/acc"] = float(np.mean(s == y))
        elif spec.kind == "binary":
            metrics[f"{spec.name}/acc"] = float(np.mean((s >= 0.5) == (y >= 0.5)))
            metrics[f"{spec.name}/auc"] = float(roc_auc_score(y, s)) if len(np.unique(y)) == 2 else float("nan")
        else:
            metrics[f"{spec.name}/mae"] = float(mean_absolute_error(y, s))
            # undefined for fewer than two samples or constant labels: NaN (null in encoder.json)
            metrics[f"{spec.name}/r2"] = float(r2_score(y, s)) if len(y) >= 2 and np.ptp(y) > 0 else float("nan")
    metrics["val_loss"] = val_loss
    return metrics


# --------------------------------------------------------------------------------------------
# Unsupervised baselines
# --------------------------------------------------------------------------------------------


class ImageDecoder(nn.Module):
    """z (N, C) -> image (N, 3, 64, 64) in [-1, 1]: a dense layer to 128 x 4 x 4, then four
    transposed convs that double the size and halve the channels (DCGAN style)."""

    def __init__(self, latent_dim: int, widths: tuple[int, ...] = (128, 64, 32, 16, 16)):
        super().__init__()
        self.first = widths[0]
        self.fc = nn.Linear(latent_dim, widths[0] * 4 * 4)
        layers: list[nn.Module] = []
        for cin, cout in zip(widths[:-1], widths[1:]):
            layers += [nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2)]
        layers += [nn.Conv2d(widths[-1], 3, 3, padding=1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(F.leaky_relu(self.fc(z), 0.2).view(-1, self.first, 4, 4))


class VAEObjective(Objective):
    """Variational autoencoder: the encoder's output is the posterior mean, a second dense layer on
    the same features gives the log-variance; the decoder reconstructs the 64 x 64 pooled tile."""

    kind = "vae"

    def __init__(self, encoder: PatchEncoder, beta: float = 1.0):
        super().__init__(encoder)
        self.beta = beta
        self.logvar = nn.Linear(encoder.trunk.features_dim, encoder.embedding_dim)
        self.decoder = ImageDecoder(encoder.embedding_dim)

    def _losses(self, x: torch.Tensor, sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encoder.features(x)
        mu = self.encoder.head_from_features(f)
        logvar = self.logvar(f).clamp(-10, 10)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if sample else mu
        target = _pooled_target(x)
        recon = self.decoder(z)
        dims = target[0].numel()
        rec = F.mse_loss(recon, target, reduction="none").flatten(1).sum(1)
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)
        # The negative ELBO per pixel (a Gaussian likelihood of fixed variance), so the loss scale
        # does not depend on the tile size.
        return (rec + self.beta * kl) / dims, rec / dims

    def forward(self, x, task_ids, labels, phase="main"):
        loss, rec = self._losses(x, sample=True)
        return {"loss": loss.mean(), "loss/recon": rec.mean().detach()}

    @torch.no_grad()
    def validation_step(self, x, task_ids, labels, generator=None):
        loss, rec = self._losses(x, sample=False)
        return {"loss": loss.cpu().numpy(), "recon": rec.cpu().numpy()}

    def validation_metrics(self, columns):
        return {"val_loss": float(np.mean(columns["loss"])), "recon_mse": float(np.mean(columns["recon"]))}


class JointDiscriminator(nn.Module):
    """D(x, z): a small conv net on the 64 x 64 image joined with a dense net on z."""

    def __init__(self, latent_dim: int, widths: tuple[int, ...] = (32, 64, 64, 64)):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for width in widths:  # 64 -> 4
            layers += [nn.Conv2d(cin, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            cin = width
        self.image = nn.Sequential(*layers, nn.Flatten())
        self.latent = nn.Sequential(nn.Linear(latent_dim, 256), nn.LeakyReLU(0.2))
        self.joint = nn.Sequential(nn.Linear(cin * 16 + 256, 256), nn.LeakyReLU(0.2), nn.Dropout(0.2),
                                   nn.Linear(256, 1))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.joint(torch.cat([self.image(x), self.latent(z)], dim=1))[:, 0]


class BiGANObjective(Objective):
    """BiGAN (Donahue et al. 2017), NIC's best unsupervised encoder: the discriminator tells
    (tile, E(tile)) pairs from (G(z), z) pairs; encoder and generator learn to fool it.

    Phase "d" updates the discriminator (encoder and generator run without gradients); phase "eg"
    updates encoder and generator with the non-saturating loss. Its validation loss is the
    discriminator's loss, which does not measure encoder quality, so it does not early-stop.
    """

    kind = "bigan"
    phases = ("d", "eg")
    early_stopping = False

    def __init__(self, encoder: PatchEncoder):
        super().__init__(encoder)
        self.generator = ImageDecoder(encoder.embedding_dim)
        self.discriminator = JointDiscriminator(encoder.embedding_dim)

    def phase_parameters(self, phase):
        if phase == "d":
            return list(self.discriminator.parameters())
        return list(self.encoder.parameters()) + list(self.generator.parameters())

    def _d_logits(self, x: torch.Tensor, z: torch.Tensor, grad_eg: bool) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.set_grad_enabled(grad_eg and torch.is_grad_enabled()):
            ez = self.encoder(x)
            gx = self.generator(z)
        return self.discriminator(_pooled_target(x), ez), self.discriminator(gx, z)

    def forward(self, x, task_ids, labels, phase="main"):
        z = torch.randn(len(x), self.encoder.embedding_dim, device=x.device)
        real, fake = self._d_logits(x, z, grad_eg=(phase == "eg"))
        ones, zeros = torch.ones_like(real), torch.zeros_like(real)
        if phase == "d":
            loss = F.binary_cross_entropy_with_logits(real, ones) + F.binary_cross_entropy_with_logits(fake, zeros)
            return {"loss": loss, "loss/d": loss.detach()}
        loss = F.binary_cross_entropy_with_logits(real, zeros) + F.binary_cross_entropy_with_logits(fake, ones)
        return {"loss": loss, "loss/eg": loss.detach()}

    @torch.no_grad()
    def validation_step(self, x, task_ids, labels, generator=None):
        z = torch.randn(len(x), self.encoder.embedding_dim, device=x.device, generator=generator)
        real, fake = self._d_logits(x, z, grad_eg=False)
        d_loss = (F.binary_cross_entropy_with_logits(real, torch.ones_like(real), reduction="none")
                  + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake), reduction="none"))
        return {"loss": d_loss.cpu().numpy(),
                "real_acc": (real > 0).float().cpu().numpy(), "fake_acc": (fake < 0).float().cpu().numpy()}

    def validation_metrics(self, columns):
        return {"val_loss": float(np.mean(columns["loss"])),
                "d_acc": float((np.mean(columns["real_acc"]) + np.mean(columns["fake_acc"])) / 2)}


def nt_xent(z: torch.Tensor, temperature: float, reduction: str = "mean") -> torch.Tensor:
    """SimCLR's NT-Xent over 2N projections where rows i and i + N are two views of one tile."""
    n2 = z.shape[0]
    if n2 % 2:
        raise ValueError("NT-Xent needs an even number of rows (two views per tile)")
    z = F.normalize(z, dim=1)
    sim = z @ z.t() / temperature
    sim = sim.masked_fill(torch.eye(n2, dtype=torch.bool, device=z.device), float("-inf"))
    half = n2 // 2
    target = torch.cat([torch.arange(half, n2), torch.arange(0, half)]).to(z.device)
    return F.cross_entropy(sim, target, reduction=reduction)


class ContrastiveObjective(Objective):
    """SimCLR-style: two augmented views per tile (the loop makes them), a projection head, and the
    NT-Xent loss; negatives are the other tiles of the worker's batch."""

    kind = "contrastive"
    num_views = 2

    def __init__(self, encoder: PatchEncoder, projection_dim: int = 64, temperature: float = 0.5):
        super().__init__(encoder)
        c = encoder.embedding_dim
        self.temperature = temperature
        self.projection = nn.Sequential(nn.Linear(c, c), nn.ReLU(inplace=True), nn.Linear(c, projection_dim))

    def forward(self, x, task_ids, labels, phase="main"):
        loss = nt_xent(self.projection(self.encoder(x)), self.temperature)
        return {"loss": loss}

    @torch.no_grad()
    def validation_step(self, x, task_ids, labels, generator=None):
        per_row = nt_xent(self.projection(self.encoder(x).clone()), self.temperature, reduction="none")
        half = len(x) // 2
        return {"loss": ((per_row[:half] + per_row[half:]) / 2).cpu().numpy()}


@dataclass
class ObjectiveSpec:
    """Everything needed to rebuild an objective on a worker (plain data, cheap to ship)."""

    kind: str
    tasks: list[TaskHeadSpec] = field(default_factory=list)
    head_hidden: int = 0
    vae_beta: float = 1.0
    projection_dim: int = 64
    temperature: float = 0.5


def build_objective(spec: ObjectiveSpec, encoder: PatchEncoder) -> Objective:
    if spec.kind == "mtl":
        return MultiTaskObjective(encoder, spec.tasks, spec.head_hidden)
    if spec.kind == "vae":
        return VAEObjective(encoder, spec.vae_beta)
    if spec.kind == "bigan":
        return BiGANObjective(encoder)
    if spec.kind == "contrastive":
        return ContrastiveObjective(encoder, spec.projection_dim, spec.temperature)
    raise ValueError(f"no training objective for encoder kind '{spec.kind}'")


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN: metrics that could not be computed (e.g. AUC of one class) become null."""
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else value
