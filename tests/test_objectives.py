"""Reward objectives beyond one Bradley-Terry pair (issue #28): the centring term."""

from __future__ import annotations

import math

import pytest
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


# List-wise (Plackett-Luce) ------------------------------------------------------


def test_listwise_k2_is_exactly_bradley_terry():
    from megarm.training.objectives.listwise import plackett_luce_loss

    gen = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(64, generator=gen, dtype=torch.float64).chunk(2)
    rewards = torch.stack([chosen, rejected], -1)
    scores = torch.tensor([[1.0, 0.0]], dtype=torch.float64).repeat(32, 1)
    bt = -torch.nn.functional.logsigmoid(chosen - rejected)
    torch.testing.assert_close(plackett_luce_loss(rewards, scores), bt, rtol=0, atol=1e-7)
    # Response order in the record does not matter, only the scores.
    torch.testing.assert_close(plackett_luce_loss(rewards.flip(-1), scores.flip(-1)), bt, rtol=0, atol=1e-7)
    # fp32 rewards (as the model gives them).
    torch.testing.assert_close(plackett_luce_loss(rewards.float(), scores), bt.float(), rtol=0, atol=1e-6)
    # And the mean matches the pairwise loss_func of the same pairs.
    pair, _ = loss_func(_pairs(), torch.tensor(CHOSEN + REJECTED))
    lists = torch.tensor([CHOSEN, REJECTED]).T
    pl = plackett_luce_loss(lists, torch.tensor([[1.0, 0.0]] * 3)).mean()
    assert math.isclose(pl.item(), pair.item(), rel_tol=1e-6)


def _pl_hand(r: list[float], groups: list[list[int]]) -> float:
    """Plackett-Luce NLL by hand: ``groups`` best first, Breslow ties, the last group adds nothing."""
    loss, left = 0.0, [i for g in groups for i in g]
    for group in groups[:-1]:
        lse = math.log(sum(math.exp(r[j]) for j in left))
        loss += sum(lse - r[i] for i in group)
        left = [j for j in left if j not in group]
    return loss


def test_listwise_loss_matches_hand_computation_with_ties_and_padding():
    from megarm.training.objectives.listwise import plackett_luce_loss

    r = [0.3, -1.2, 2.0, 0.5]
    rewards = torch.tensor([r, r, r, r, r])
    scores = torch.tensor([
        [4.0, 3.0, 2.0, 1.0],  # strict order 0 > 1 > 2 > 3
        [1.0, 3.0, 3.0, 2.0],  # 1 = 2 tied on top, then 3, then 0
        [5.0, 5.0, 5.0, 5.0],  # all tied: no information
        [2.0, 1.0, 1.0, 1.0],  # 0, then three tied at the bottom
        [1.0, 2.0, 0.0, 0.0],  # K=2 record padded to 4 (slots 2, 3 invalid)
    ])
    valid = torch.tensor([[True] * 4] * 4 + [[True, True, False, False]])
    hand = [
        _pl_hand(r, [[0], [1], [2], [3]]),
        _pl_hand(r, [[1, 2], [3], [0]]),
        0.0,
        _pl_hand(r, [[0], [1, 2, 3]]),
        _pl_hand(r[:2], [[1], [0]]),
    ]
    rewards.requires_grad_(True)
    loss = plackett_luce_loss(rewards, scores, valid)
    torch.testing.assert_close(loss, torch.tensor(hand), rtol=1e-6, atol=1e-6)
    loss.sum().backward()
    assert torch.isfinite(rewards.grad).all()
    assert rewards.grad[2].abs().max() == 0 and rewards.grad[4, 2:].abs().max() == 0


def test_listwise_metrics_count_top1_pairs_and_kendall_tau():
    from megarm.training.objectives.listwise import ranking_metrics, ranking_stats

    scores = torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 2.0]])
    rewards = torch.tensor([[0.9, 0.1, 0.5], [0.0, 1.0, 0.2]])
    # Record 0: top-1 right; pairs (0,1) +, (0,2) +, (1,2) - -> 2 of 3.
    # Record 1: top-1 wrong (reward max on a score-2 item); pairs (0,1) -, (0,2) -; (1,2) tied, not a pair.
    m = ranking_metrics(ranking_stats(rewards, scores))
    assert m["top1_accuracy"] == 0.5
    assert m["pairs"] == 5 and math.isclose(m["pairwise_accuracy"], 2 / 5)
    assert math.isclose(m["kendall_tau"], (2 - 3) / 5)
    assert m["lists"] == 2


# Ranked records --------------------------------------------------------------


def test_ranked_handler_reads_k_responses_and_rejects_with_reasons():
    import pytest

    from megarm.data.handlers import RecordError
    from megarm.data.ranked import RankedHandler

    handler = RankedHandler()
    good = {"prompt": "q", "responses": ["a", "b", "c", "d"], "scores": [1, 3, 2, 2.5]}
    record = handler(good)
    assert record.prompt == [{"role": "user", "content": "q"}]
    assert record.responses == ["a", "b", "c", "d"] and record.scores == [1.0, 3.0, 2.0, 2.5]
    assert handler({**good, "responses": '["a", "b"]', "scores": "[0, 1]"}).scores == [0.0, 1.0]
    bad = {
        "too_few_responses": {**good, "responses": ["a"], "scores": [1]},
        "score_count": {**good, "scores": [1, 2, 3]},
        "malformed_record": {**good, "scores": [1, float("nan"), 2, 3]},
        "empty_response": {**good, "responses": ["a", " ", "c", "d"]},
        "identical": {**good, "responses": ["a", "a", "c", "d"]},
        "tie": {**good, "scores": [2, 2, 2, 2]},
        "missing_key": {"prompt": "q", "responses": ["a", "b"]},
    }
    for reason, row in bad.items():
        with pytest.raises(RecordError) as err:
            handler(row)
        assert err.value.reason == reason, (reason, err.value)


def test_ultrafeedback_completions_become_a_ranked_record():
    import pytest

    from megarm.data.handlers import RecordError
    from megarm.data.ranked import UltraFeedbackRankedHandler

    row = {
        "instruction": "Name a prime.",
        "completions": [
            {"response": f"answer {i}", "overall_score": score, "model": "m"}
            for i, score in enumerate([7.5, 4.0, 9.0, 6.0])
        ],
    }
    record = UltraFeedbackRankedHandler()(row)
    assert record.scores == [7.5, 4.0, 9.0, 6.0] and record.responses[2] == "answer 2"
    row["completions"][1].pop("overall_score")
    with pytest.raises(RecordError) as err:
        UltraFeedbackRankedHandler()(row)
    assert err.value.reason == "score_count"


# The centring term through the training loop ------------------------------------


def _train_centred(coef: float, overrides: tuple[str, ...] = (), full: dict | None = None):
    """2 steps from known weights; the reference run (``full`` None) makes them and
    recomputes the first step's BT and centring terms in float64."""
    from megarm import distributed
    from megarm.training.data import micro_batches
    from megarm.training.loop import Trainer
    from tests.helpers import load_full_state, randomize_
    from tests.test_training import BASE

    cfg = tiny_config(*BASE, "training.train_iters=2", f"training.center_rewards_coefficient={coef}", *overrides)
    distributed.init_from_config(cfg)
    trainer = Trainer(cfg)
    bt = center = None
    if full is None:
        full = randomize_(trainer.model[0].module.state_dict())
        load_full_state(trainer, full)
        model = trainer.model[0].module
        chosen, rejected = [], []
        stream = micro_batches(trainer.data.train, cfg, 0, 0, 1)
        with torch.no_grad():
            for _ in range(trainer.num_microbatches):
                batch = next(stream)
                r = model(batch.tokens, batch.position_ids, None, batch.reward_index).double()
                chosen.append(r[: batch.num_pairs])
                rejected.append(r[batch.num_pairs :])
        c, r = torch.cat(chosen), torch.cat(rejected)
        bt = float(-torch.nn.functional.logsigmoid(c - r).mean())
        center = coef * float(((c + r) ** 2).mean())
    else:
        load_full_state(trainer, full)
    trainer.train()
    keys = ("loss", "bt_loss", "center_loss", "grad_norm")
    return [{k: h[k] for k in keys} for h in trainer.history], bt, center, full


def test_training_logs_the_centring_term_and_adds_it_to_the_loss():
    from megarm.testing import run_distributed

    ((history, bt, center, _),) = run_distributed(_train_centred, 1, 0.5)
    first = history[0]
    assert center > 1e-3  # the term is not negligible at these random weights
    assert math.isclose(first["center_loss"], center, rel_tol=1e-5)
    assert math.isclose(first["bt_loss"], bt, rel_tol=1e-5)
    assert math.isclose(first["loss"], bt + center, rel_tol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    pytest.param(("parallel.tensor_model_parallel_size=2",), id="tp2"),
    pytest.param((), id="dp2"),
])
def test_centring_term_under_tp2_and_dp2_equals_one_process(overrides):
    from megarm.testing import run_distributed

    ((expected, _, _, full),) = run_distributed(_train_centred, 1, 0.5)
    for history, *_ in run_distributed(_train_centred, 2, 0.5, overrides, full):
        for got, want in zip(history, expected, strict=True):
            for key in ("loss", "center_loss", "grad_norm"):
                assert math.isclose(got[key], want[key], rel_tol=1e-5), (key, got, want)


def test_all_pairs_listwise_loss_is_the_hand_mean_bradley_terry_over_pairs():
    from megarm.training.objectives.listwise import all_pairs_loss

    r = [0.3, -1.2, 2.0, 0.5]
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 3.0, 3.0, 2.0], [5.0, 5.0, 5.0, 5.0],
                           [1.0, 2.0, 0.0, 0.0]])
    valid = torch.tensor([[True] * 4] * 3 + [[True, True, False, False]])

    def bt(a: float, b: float) -> float:
        return math.log1p(math.exp(-(a - b)))

    def hand(s: list[float], k: int) -> float:
        pairs = [(i, j) for i in range(k) for j in range(k) if s[i] > s[j]]
        return sum(bt(r[i], r[j]) for i, j in pairs) / len(pairs) if pairs else 0.0

    want = [hand(scores[0].tolist(), 4), hand(scores[1].tolist(), 4), 0.0, bt(r[1], r[0])]
    got = all_pairs_loss(torch.tensor([r] * 4, dtype=torch.float64), scores, valid)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    # K=2 is Bradley-Terry; the pairs of record 1: (1,3), (1,0), (2,3), (2,0), (3,0) = 5.
    assert math.isclose(want[3], -math.log(1 / (1 + math.exp(-(r[1] - r[0])))), rel_tol=1e-12)

