"""training.objective listwise (issue #28): ranked records of K responses through the
training loop, preprocessing and the data checks."""

from __future__ import annotations

import math

import pytest
import torch

from megarm.testing import run_distributed
from tests.helpers import load_full_state, randomize_, tiny_config
from tests.test_training import BASE

LISTWISE = (*BASE, "training.objective=listwise", "training.train_iters=2",
            "data.synthetic_num_responses=4", "training.global_batch_size=4")


def pl_hand(rewards: list[float], scores: list[float]) -> float:
    """Plackett-Luce NLL of the score order by hand: groups of equal score best
    first, each response of a group against everything not ranked above it
    (Breslow), the last group adds nothing."""
    loss = 0.0
    for i, s_i in enumerate(scores):
        below = [j for j, s_j in enumerate(scores) if s_j < s_i]
        if not below:
            continue
        risk = [j for j, s_j in enumerate(scores) if s_j <= s_i]
        loss += math.log(sum(math.exp(rewards[j]) for j in risk)) - rewards[i]
    return loss


def _train_listwise(overrides: tuple[str, ...] = (), full: dict | None = None, coef: float = 0.0):
    """2 steps from known weights; the reference run (``full`` None) makes them and
    computes the first step's list-wise loss and metrics by hand from the rewards."""
    from megarm import distributed
    from megarm.training.data import micro_batches
    from megarm.training.loop import Trainer

    cfg = tiny_config(*LISTWISE, f"training.center_rewards_coefficient={coef}", *overrides)
    distributed.init_from_config(cfg)
    trainer = Trainer(cfg)
    hand = None
    if full is None:
        full = randomize_(trainer.model[0].module.state_dict())
        load_full_state(trainer, full)
        model = trainer.model[0].module
        losses, all_pairs, centre, top1, concordant, pairs = [], [], [], 0, 0, 0
        stream = micro_batches(trainer.data.train, cfg, 0, 0, 1)
        with torch.no_grad():
            for _ in range(trainer.num_microbatches):
                batch = next(stream)
                flat = model(batch.tokens, batch.position_ids, None, batch.reward_index).double().tolist()
                at = 0
                for scores, valid in zip(batch.scores.tolist(), batch.valid.tolist(), strict=True):
                    k = sum(valid)
                    r, s = flat[at : at + k], scores[:k]
                    at += k
                    losses.append(pl_hand(r, s))
                    pair_losses = [math.log1p(math.exp(-(r[i] - r[j])))
                                   for i in range(k) for j in range(k) if s[i] > s[j]]
                    all_pairs.append(sum(pair_losses) / len(pair_losses))
                    centre.append((2 * sum(r) / k) ** 2)
                    top1 += s[r.index(max(r))] == max(s)
                    for i in range(k):
                        for j in range(k):
                            if s[i] > s[j]:
                                pairs += 1
                                concordant += r[i] > r[j]
                assert at == len(flat)
        n = len(losses)
        hand = {"pl_loss": sum(losses) / n, "all_pairs_loss": sum(all_pairs) / n, "center_loss": coef * sum(centre) / n,
                "top1_accuracy": top1 / n, "pairwise_accuracy": concordant / pairs,
                "lists": n, "ranked_pairs": pairs}
    else:
        load_full_state(trainer, full)
    trainer.train()
    keys = ("loss", "grad_norm", "top1_accuracy", "pairwise_accuracy", "kendall_tau",
            "lists", "tokens", "sequences")
    return [{k: h[k] for k in keys} for h in trainer.history], hand, full


@pytest.fixture(scope="module")
def reference():
    ((history, hand, full),) = run_distributed(_train_listwise, 1, (), None, 0.5)
    return history, hand, full


def test_listwise_training_step_loss_equals_the_hand_plackett_luce_loss(reference):
    history, hand, _ = reference
    first = history[0]
    assert hand["lists"] == 4 and hand["ranked_pairs"] == 4 * 6  # 4 records, K=4 distinct scores
    assert first["lists"] == 4 and first["sequences"] == 16  # each response once
    assert math.isclose(first["loss"], hand["pl_loss"] + hand["center_loss"], rel_tol=1e-5)
    assert hand["center_loss"] > 1e-3
    assert first["top1_accuracy"] == hand["top1_accuracy"]
    assert math.isclose(first["pairwise_accuracy"], hand["pairwise_accuracy"], rel_tol=1e-12)
    assert math.isclose(first["kendall_tau"], 2 * hand["pairwise_accuracy"] - 1, rel_tol=1e-9)
    assert history[1]["loss"] != first["loss"]  # the optimizer stepped


@pytest.mark.slow
@pytest.mark.parametrize("world, overrides", [
    pytest.param(2, ("parallel.tensor_model_parallel_size=2",), id="tp2"),
    pytest.param(2, ("parallel.pipeline_model_parallel_size=2",), id="pp2"),
    pytest.param(2, (), id="dp2"),
    pytest.param(1, ("data.packing=true", "data.packed_format=thd"), id="thd"),
    pytest.param(1, ("data.packing=true", "data.packed_format=rows"), id="rows"),
])
def test_listwise_under_tp2_dp2_and_packing_equals_one_process(world, overrides, reference):
    expected, _, full = reference
    for history, *_ in run_distributed(_train_listwise, world, overrides, full, 0.5):
        # The first step to the 1e-6; every step after within 1e-5.
        for key in ("loss", "grad_norm"):
            assert math.isclose(history[0][key], expected[0][key], rel_tol=1e-6), (key, history[0])
        for got, want in zip(history, expected, strict=True):
            for key in ("loss", "grad_norm", "kendall_tau", "tokens"):
                assert math.isclose(got[key], want[key], rel_tol=1e-5), (key, got, want)


def test_all_pairs_listwise_loss_from_a_training_step_equals_the_hand_average():
    ((history, hand, _),) = run_distributed(
        _train_listwise, 1, ("training.listwise_loss=all_pairs",), None, 0.0)
    assert math.isclose(history[0]["loss"], hand["all_pairs_loss"], rel_tol=1e-5)
    assert not math.isclose(hand["all_pairs_loss"], hand["pl_loss"], rel_tol=1e-2)
