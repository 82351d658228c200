"""training.objective prm (issue #29): the value head read at every step-end marker,
a per-step loss averaged over the global batch's steps, and its metrics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megarm.testing import run_distributed
from tests.helpers import load_full_state, randomize_, tiny_config
from tests.test_training import BASE

PRM = (*BASE, "training.objective=prm", "training.train_iters=2")
KEYS = ("loss", "grad_norm", "step_accuracy", "negative_f1", "first_error_accuracy", "steps")


def _first_error(bad: list[bool]) -> int:
    return bad.index(True) if True in bad else -1


def _train_prm(overrides: tuple[str, ...] = (), full: dict | None = None):
    """2 steps from known weights. The reference run makes the weights and computes
    the first step's loss and metrics by hand: every record of the global batch on
    its own (one unpadded row), its values read at the record's step positions."""
    from megarm import distributed
    from megarm.data.dataset import PairBatchSampler
    from megarm.training.loop import Trainer

    cfg = tiny_config(*PRM, *overrides)
    distributed.init_from_config(cfg)
    trainer = Trainer(cfg)
    hand = None
    if full is None:
        full = randomize_(trainer.model[0].module.state_dict())
        load_full_state(trainer, full)
        model = trainer.model[0].module
        t = cfg.training
        sampler = iter(PairBatchSampler(len(trainer.data.train), t.micro_batch_size, 0, 1, 0,
                                        True, t.seed))
        losses, correct, tp, fp, fn, first_ok, solutions = [], 0, 0, 0, 0, 0, 0
        with torch.no_grad():
            for _ in range(trainer.num_microbatches):
                for index in next(sampler):
                    item = trainer.data.train[index]
                    ids = torch.as_tensor(item["input_ids"], dtype=torch.long)[None]
                    at = torch.as_tensor(item["step_positions"], dtype=torch.long)
                    pos = torch.arange(ids.shape[1])[None]
                    logits = model(ids, pos, None, at, torch.zeros_like(at)).double()
                    y = torch.as_tensor(item["step_targets"], dtype=torch.float64)
                    losses += F.binary_cross_entropy_with_logits(logits, y, reduction="none").tolist()
                    pred_bad, bad = (logits < 0).tolist(), (y < 0.5).tolist()
                    correct += sum(p == b for p, b in zip(pred_bad, bad, strict=True))
                    tp += sum(p and b for p, b in zip(pred_bad, bad, strict=True))
                    fp += sum(p and not b for p, b in zip(pred_bad, bad, strict=True))
                    fn += sum(b and not p for p, b in zip(pred_bad, bad, strict=True))
                    first_ok += _first_error(pred_bad) == _first_error(bad)
                    solutions += 1
        hand = {"loss": sum(losses) / len(losses), "steps": len(losses),
                "step_accuracy": correct / len(losses), "negative_f1": 2 * tp / (2 * tp + fp + fn),
                "first_error_accuracy": first_ok / solutions, "negatives": tp + fn}
    else:
        load_full_state(trainer, full)
    trainer.train()
    return [{k: h[k] for k in KEYS} for h in trainer.history], hand, full


@pytest.fixture(scope="module")
def reference():
    ((history, hand, full),) = run_distributed(_train_prm, 1, (), None)
    return history, hand, full


def test_prm_step_loss_and_metrics_are_the_hand_computation(reference):
    history, hand, _ = reference
    first = history[0]
    # The global batch mixes solutions of different step counts, and bad steps.
    assert hand["steps"] > 8 and hand["negatives"] >= 1
    assert first["steps"] == hand["steps"]
    assert math.isclose(first["loss"], hand["loss"], rel_tol=1e-6), (first, hand)
    for key in ("step_accuracy", "negative_f1", "first_error_accuracy"):
        assert math.isclose(first[key], hand[key], rel_tol=1e-9), key
    assert history[1]["loss"] != first["loss"]


@pytest.mark.slow
@pytest.mark.parametrize("world, overrides", [
    pytest.param(2, ("parallel.tensor_model_parallel_size=2",), id="tp2"),
    pytest.param(2, ("parallel.pipeline_model_parallel_size=2",), id="pp2"),
    pytest.param(2, (), id="dp2"),  # 2 micro-batches per rank: accumulation
    pytest.param(1, ("data.packing=true", "data.packed_format=thd"), id="thd"),
])
def test_prm_under_tp2_pp2_dp2_and_thd_equals_one_process(world, overrides, reference):
    expected, _, full = reference
    for history, *_ in run_distributed(_train_prm, world, overrides, full):
        for key in ("loss", "grad_norm"):
            assert math.isclose(history[0][key], expected[0][key], rel_tol=1e-6), (key, history[0])
        for got, want in zip(history, expected, strict=True):
            for key in ("loss", "grad_norm", "step_accuracy"):
                assert math.isclose(got[key], want[key], rel_tol=1e-5), (key, got, want)


def test_prm_config_refuses_unverified_combinations_naming_the_key():
    from megarm.config.checks import validate

    def keys(*over: str) -> set[str]:
        return {i.key for i in validate(tiny_config("training.objective=prm", *over))}

    assert not keys()
    assert "parallel.context_parallel_size" in keys("parallel.context_parallel_size=2")
    assert keys("training.reward_offsets=[1]") == {"training.reward_offsets"}
    assert keys("model.num_labels=2", "model.label_names=a,b") == {"model.num_labels"}
    assert keys("training.center_rewards_coefficient=0.01") == {
        "training.center_rewards_coefficient"}
    from megarm.config import ConfigError

    with pytest.raises(ConfigError, match="training.prm_loss"):
        tiny_config("training.objective=prm", "training.prm_loss=hinge")
