"""Reward objectives beyond one Bradley-Terry pair (issue #28): the centring term."""

from __future__ import annotations

import math

import torch

from megarm.config.checks import validate
from megarm.model.step import PairBatch
from megarm.training.loss import loss_func, reduce_stats
from tests.helpers import tiny_config

CHOSEN = [1.5, -0.25, 0.75]
REJECTED = [0.5, 0.5, -2.0]


def _pairs() -> PairBatch:
    b, s = len(CHOSEN), 4
    return PairBatch(
        tokens=torch.zeros(2 * b, s, dtype=torch.long),
        position_ids=torch.arange(s).repeat(2 * b, 1),
        reward_index=torch.full((2 * b,), s - 1),
        margin=torch.zeros(b),
    )


def _hand(coef: float) -> tuple[float, float]:
    bt = sum(math.log1p(math.exp(-(c - r))) for c, r in zip(CHOSEN, REJECTED, strict=True)) / 3
    center = sum((c + r) ** 2 for c, r in zip(CHOSEN, REJECTED, strict=True)) / 3
    return bt, coef * center


def test_center_rewards_term_is_the_hand_computed_mean_square():
    # TRL: loss = -logsigmoid(rc - rr).mean() + coef * mean((rc + rr)^2).
    # Hand: gaps 1.0, -0.75, 2.75; sums 2.0, 0.25, -1.25 -> mean square 5.625 / 3 = 1.875 (0.01875 at 0.01).
    rewards = torch.tensor(CHOSEN + REJECTED, requires_grad=True)
    bt, center = _hand(0.01)
    assert math.isclose(center, 0.01875, rel_tol=1e-12)
    loss, out = loss_func(_pairs(), rewards, center_coef=0.01)
    assert math.isclose(loss.item(), bt + center, rel_tol=1e-6)
    plain, _ = loss_func(_pairs(), rewards)
    assert math.isclose(plain.item(), bt, rel_tol=1e-6)
    # The gradient of the term: d/dr_i coef * mean(s^2) = 2 coef s_i / b for both sides.
    (loss - plain).backward()
    sums = torch.tensor(CHOSEN) + torch.tensor(REJECTED)
    torch.testing.assert_close(rewards.grad, (2 * 0.01 * sums / 3).repeat(2), rtol=1e-6, atol=0)
    metrics = reduce_stats([out], center_coef=0.01)
    assert math.isclose(metrics["center_loss"], center, rel_tol=1e-12)
    assert math.isclose(metrics["bt_loss"], bt, rel_tol=1e-6)
    assert math.isclose(metrics["loss"], bt + center, rel_tol=1e-6)
    # Off by default: no extra metric keys, the loss is the Bradley-Terry mean.
    assert "center_loss" not in reduce_stats([out])


def test_center_rewards_coefficient_must_be_non_negative():
    assert not [i for i in validate(tiny_config("training.center_rewards_coefficient=0.01"))]
    for bad in ("-0.1", "nan"):
        issues = validate(tiny_config(f"training.center_rewards_coefficient={bad}"))
        assert {i.key for i in issues} == {"training.center_rewards_coefficient"}, issues
