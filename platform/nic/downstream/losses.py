"""Losses for slide-level targets: cross-entropy, MSE and the Cox partial likelihood.

The Cox loss is the project's own because the usual one-liners get two things wrong that matter on
small survival cohorts: tied event times (slides of the same follow-up visit) and numerical
stability when log-risks grow during training. Here the risk-set sums are log-sum-exps over the
samples sorted by time, and ties use Efron's (default) or Breslow's approximation, matching the
log partial likelihood that lifelines' CoxPHFitter maximises (Efron).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

Kind = Literal["binary", "multiclass", "regression", "survival"]


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary (one logit, target 0/1) or multiclass (K logits, integer target) cross-entropy, mean."""
    if logits.ndim == 2 and logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(logits[:, 0], target.to(logits.dtype))
    return F.cross_entropy(logits, target.long())


def mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error; a (B, 1) prediction is compared with a (B,) target."""
    if prediction.ndim == 2 and prediction.shape[1] == 1:
        prediction = prediction[:, 0]
    return F.mse_loss(prediction, target.to(prediction.dtype))


def cox_ph_loss(
    log_risk: torch.Tensor,
    time: torch.Tensor,
    event: torch.Tensor,
    ties: Literal["efron", "breslow"] = "efron",
) -> torch.Tensor:
    """Mean negative Cox log partial likelihood over the events of a batch.

    For each distinct event time t with d tied events D and risk set R = {k: time_k >= t}:
      Breslow: sum_{i in D} eta_i - d * log sum_{k in R} exp(eta_k)
      Efron:   sum_{i in D} eta_i - sum_{l=0}^{d-1} log( sum_{k in R} exp(eta_k) - l/d * sum_{i in D} exp(eta_i) )
    The loss is minus the sum over event times, divided by the number of events. A batch with no
    event carries no information: the loss is 0 with a zero (not NaN) gradient.

    Args:
        log_risk: (B,) or (B, 1) predicted log hazard ratios (higher = earlier event).
        time: (B,) follow-up times (> 0).
        event: (B,) 1 if the event was observed at `time`, 0 if censored.
        ties: "efron" (default, as lifelines) or "breslow".
    """
    if ties not in ("efron", "breslow"):
        raise ValueError(f"cox_ph_loss: ties must be 'efron' or 'breslow', got {ties!r}")
    eta = log_risk.reshape(-1)
    time = time.reshape(-1).to(eta.device)
    event = event.reshape(-1).to(eta.device)
    if not (eta.shape == time.shape == event.shape):
        raise ValueError(
            f"cox_ph_loss: log_risk, time and event must have one value per sample, "
            f"got shapes {tuple(log_risk.shape)}, {tuple(time.shape)}, {tuple(event.shape)}"
        )
    is_event = event > 0.5
    n_events = int(is_event.sum())
    if n_events == 0:
        return (eta * 0.0).sum()

    # Sort by time, latest first: the risk set of a time is a prefix of this order.
    order = torch.argsort(time, descending=True, stable=True)
    eta_s, time_s, ev_s = eta[order], time[order], is_event[order]
    # Group tied times; `group` is the index of each sample's distinct time (in descending order).
    _, group, counts = torch.unique_consecutive(time_s, return_inverse=True, return_counts=True)
    n_groups = counts.shape[0]
    last = torch.cumsum(counts, 0) - 1  # last sorted position of each tie group
    log_risk_set = torch.logcumsumexp(eta_s, 0)[last]  # log sum_{k in R_g} exp(eta_k), per group

    ev_f = ev_s.to(eta_s.dtype)
    d = torch.zeros(n_groups, dtype=eta_s.dtype, device=eta_s.device).index_add_(0, group, ev_f)
    if ties == "breslow":
        term = log_risk_set[group]
    else:
        # log sum_{i in D_g} exp(eta_i), stably: shift by the (detached) max eta among the group's events.
        neg_inf = torch.full_like(eta_s, float("-inf"))
        ev_eta = torch.where(ev_s, eta_s.detach(), neg_inf)
        gmax = torch.full((n_groups,), float("-inf"), dtype=eta_s.dtype, device=eta_s.device)
        gmax = gmax.scatter_reduce(0, group, ev_eta, reduce="amax", include_self=True)
        gmax = torch.where(torch.isfinite(gmax), gmax, torch.zeros_like(gmax))
        shifted = torch.exp(torch.where(ev_s, eta_s - gmax[group], neg_inf))
        tied_sum = torch.zeros(n_groups, dtype=eta_s.dtype, device=eta_s.device).index_add_(0, group, shifted)
        log_tied = torch.log(tied_sum.clamp_min(torch.finfo(eta_s.dtype).tiny)) + gmax
        # Rank l of each event among its group's events (0..d-1).
        cum = torch.cumsum(ev_f, 0)
        before_group = (cum[last] - d)[group]
        rank = cum - before_group - 1.0
        frac = rank / d[group].clamp_min(1.0)
        ratio = torch.exp(log_tied[group] - log_risk_set[group])  # <= 1: D is part of R
        term = log_risk_set[group] + torch.log1p(-(frac * ratio).clamp(max=1.0 - 1e-7))
    log_lik = torch.where(ev_s, eta_s - term, torch.zeros_like(eta_s)).sum()
    return -log_lik / n_events


LossFn = Callable[[torch.Tensor, dict], torch.Tensor]


def loss_for(kind: Kind, ties: Literal["efron", "breslow"] = "efron") -> LossFn:
    """The loss of a target kind as f(model_output, batch) where batch holds target / time / event."""
    if kind in ("binary", "multiclass"):
        return lambda out, batch: cross_entropy(out, batch["target"])
    if kind == "regression":
        return lambda out, batch: mse(out, batch["target"])
    if kind == "survival":
        return lambda out, batch: cox_ph_loss(out, batch["time"], batch["event"], ties=ties)
    raise ValueError(f"unknown target kind {kind!r}; expected binary, multiclass, regression or survival")
