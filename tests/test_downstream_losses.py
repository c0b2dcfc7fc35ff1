"""Losses: the Cox partial likelihood against a hand-computed case with ties and censoring and against
lifelines' CoxPHFitter; cross-entropy and MSE against their formulas."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from nic.downstream.losses import cox_ph_loss, cross_entropy, loss_for, mse

# 6 subjects: ties at t=2 (two events and one censored), censoring at t=5.
TIME = [1.0, 2.0, 2.0, 2.0, 4.0, 5.0]
EVENT = [1, 1, 1, 0, 1, 0]
ETA = [0.5, -0.3, 0.8, 0.1, -0.6, 0.2]


def _hand_log_lik(ties: str) -> float:
    e = [math.exp(x) for x in ETA]
    all_six = sum(e)  # risk set at t=1: everyone
    from_two = e[1] + e[2] + e[3] + e[4] + e[5]  # risk set at t=2: subjects 2-6
    tied = e[1] + e[2]  # the two events at t=2
    from_four = e[4] + e[5]  # risk set at t=4
    ll_t1 = ETA[0] - math.log(all_six)
    if ties == "breslow":
        ll_t2 = (ETA[1] + ETA[2]) - 2 * math.log(from_two)
    else:  # Efron: the second tied event sees the risk set minus half of the tied risk
        ll_t2 = (ETA[1] + ETA[2]) - math.log(from_two) - math.log(from_two - 0.5 * tied)
    ll_t4 = ETA[4] - math.log(from_four)
    return ll_t1 + ll_t2 + ll_t4


@pytest.mark.parametrize("ties", ["efron", "breslow"])
def test_cox_matches_hand_computed_case_with_ties_and_censoring(ties):
    loss = cox_ph_loss(torch.tensor(ETA, dtype=torch.float64), torch.tensor(TIME), torch.tensor(EVENT), ties=ties)
    expected = -_hand_log_lik(ties) / 4  # mean over the 4 events
    assert loss.item() == pytest.approx(expected, rel=1e-10)


def test_cox_efron_and_breslow_differ_only_with_ties():
    eta = torch.tensor(ETA, dtype=torch.float64)
    with_ties = [cox_ph_loss(eta, torch.tensor(TIME), torch.tensor(EVENT), ties=t).item() for t in ("efron", "breslow")]
    assert with_ties[0] != pytest.approx(with_ties[1])
    distinct = torch.tensor([1.0, 2.0, 2.5, 3.0, 4.0, 5.0])
    without = [cox_ph_loss(eta, distinct, torch.tensor(EVENT), ties=t).item() for t in ("efron", "breslow")]
    assert without[0] == pytest.approx(without[1], rel=1e-12)


def test_cox_is_invariant_to_sample_order():
    perm = [3, 0, 5, 2, 4, 1]
    a = cox_ph_loss(torch.tensor(ETA), torch.tensor(TIME), torch.tensor(EVENT))
    b = cox_ph_loss(torch.tensor(ETA)[perm], torch.tensor(TIME)[perm], torch.tensor(EVENT)[perm])
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_cox_matches_lifelines_log_likelihood_of_one_covariate_fit():
    from lifelines import CoxPHFitter

    rng = np.random.default_rng(3)
    x = rng.normal(size=60)
    time = rng.integers(1, 10, size=60).astype(float)  # many tied times
    event = (rng.random(60) < 0.7).astype(float)
    cph = CoxPHFitter().fit(pd.DataFrame({"x": x, "t": time, "e": event}), "t", "e")
    beta = float(cph.params_["x"])
    b = torch.tensor(beta, dtype=torch.float64, requires_grad=True)
    loss = cox_ph_loss(b * torch.tensor(x), torch.tensor(time), torch.tensor(event))
    assert -loss.item() * event.sum() == pytest.approx(cph.log_likelihood_, rel=1e-9)
    loss.backward()  # lifelines' estimate is the maximum: the gradient there vanishes
    assert abs(b.grad.item()) < 1e-3


def test_cox_without_events_is_zero_with_zero_gradient():
    eta = torch.tensor([0.3, -1.0, 2.0], requires_grad=True)
    loss = cox_ph_loss(eta, torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(eta.grad, torch.zeros(3))


def test_cox_is_stable_for_huge_log_risks():
    eta = torch.tensor([1000.0, 999.0, -1000.0, 5.0], requires_grad=True)
    loss = cox_ph_loss(eta, torch.tensor([1.0, 1.0, 2.0, 3.0]), torch.tensor([1, 1, 1, 0]))
    loss.backward()
    # By hand: t=1 ties (Efron): 1999 - [logS + log(S - S_D/2)] with S ~= S_D ~= e^1000 (1 + e^-1);
    # t=2: -1000 - log(e^-1000 + e^5) ~= -1005.
    log_s = 1000 + math.log1p(math.exp(-1))
    expected = -((1999 - 2 * log_s + math.log(2)) + (-1000 - 5)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert torch.isfinite(eta.grad).all()


def test_cox_rejects_bad_arguments():
    with pytest.raises(ValueError, match="ties"):
        cox_ph_loss(torch.zeros(2), torch.ones(2), torch.ones(2), ties="exact")
    with pytest.raises(ValueError, match="one value per sample"):
        cox_ph_loss(torch.zeros(3), torch.ones(2), torch.ones(2))


def test_cross_entropy_binary_and_multiclass():
    logits = torch.tensor([[2.0], [-1.0]])
    target = torch.tensor([1, 0])
    p = torch.sigmoid(logits[:, 0])
    expected = -(math.log(p[0]) + math.log(1 - p[1])) / 2
    assert cross_entropy(logits, target).item() == pytest.approx(expected, rel=1e-6)
    logits3 = torch.tensor([[1.0, 2.0, 0.5]])
    expected3 = -math.log(math.exp(0.5) / (math.exp(1) + math.exp(2) + math.exp(0.5)))
    assert cross_entropy(logits3, torch.tensor([2])).item() == pytest.approx(expected3, rel=1e-6)


def test_mse_and_loss_dispatch():
    pred = torch.tensor([[1.0], [3.0]])
    assert mse(pred, torch.tensor([0.0, 1.0])).item() == pytest.approx((1 + 4) / 2)
    batch = {"target": torch.tensor([0.0, 1.0])}
    assert loss_for("regression")(pred, batch).item() == pytest.approx(2.5)
    sbatch = {"time": torch.tensor(TIME), "event": torch.tensor(EVENT)}
    assert loss_for("survival", ties="breslow")(torch.tensor(ETA)[:, None], sbatch).item() == pytest.approx(
        -_hand_log_lik("breslow") / 4, rel=1e-6)
    with pytest.raises(ValueError, match="unknown target kind"):
        loss_for("ranking")
