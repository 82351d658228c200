"""training.objective regression (issue #28): a num_labels-output head regressed on
per-attribute labels, missing labels masked, per-attribute weights."""

from __future__ import annotations

import math

import pytest
import torch

from megarm.testing import run_distributed
from tests.helpers import load_full_state, randomize_, tiny_config
from tests.test_training import BASE

WEIGHTS = [1.0, 0.5, 2.0]
REGRESSION = (*BASE, "training.objective=regression", "training.train_iters=2",
              "model.num_labels=3", "model.label_names=help,correct,verbose",
              "training.label_weights=" + ",".join(map(str, WEIGHTS)))


def _train_regression(overrides: tuple[str, ...] = (), full: dict | None = None):
    """2 steps from known weights; the reference run makes them and computes the
    first step's loss and per-attribute metrics by hand from the predictions."""
    from megarm import distributed
    from megarm.training.data import micro_batches
    from megarm.training.loop import Trainer

    cfg = tiny_config(*REGRESSION, *overrides)
    distributed.init_from_config(cfg)
    trainer = Trainer(cfg)
    hand = None
    if full is None:
        full = randomize_(trainer.model[0].module.state_dict())
        load_full_state(trainer, full)
        model = trainer.model[0].module
        rows = []  # (predictions, labels with None where missing)
        stream = micro_batches(trainer.data.train, cfg, 0, 0, 1)
        with torch.no_grad():
            for _ in range(trainer.num_microbatches):
                batch = next(stream)
                out = model(batch.tokens, batch.position_ids, None, batch.reward_index).double()
                for p, y, m in zip(out.tolist(), batch.targets.tolist(), batch.target_mask.tolist(),
                                   strict=True):
                    rows.append((p, [v if k else None for v, k in zip(y, m, strict=True)]))
        num = sum(w * (p[a] - y[a]) ** 2 for p, y in rows for a, w in enumerate(WEIGHTS)
                  if y[a] is not None)
        den = sum(w for _, y in rows for a, w in enumerate(WEIGHTS) if y[a] is not None)
        hand = {"loss": num / den, "missing": sum(v is None for _, y in rows for v in y)}
        for a, name in enumerate(("help", "correct", "verbose")):
            pairs = [(p[a], y[a]) for p, y in rows if y[a] is not None]
            hand[f"rmse/{name}"] = math.sqrt(sum((p - y) ** 2 for p, y in pairs) / len(pairs))
            mp, my = (sum(v) / len(pairs) for v in zip(*pairs, strict=True))
            cov = sum((p - mp) * (y - my) for p, y in pairs)
            hand[f"pearson/{name}"] = cov / math.sqrt(
                sum((p - mp) ** 2 for p, _ in pairs) * sum((y - my) ** 2 for _, y in pairs))
    else:
        load_full_state(trainer, full)
    trainer.train()
    keys = ("loss", "grad_norm", "rmse/help", "rmse/verbose", "pearson/correct", "labelled/help")
    return [{k: h[k] for k in keys} | {k: h[k] for k in h if "/" in k} for h in trainer.history], \
        hand, full


@pytest.fixture(scope="module")
def reference():
    ((history, hand, full),) = run_distributed(_train_regression, 1, (), None)
    return history, hand, full


def test_regression_step_loss_is_the_hand_weighted_masked_mse(reference):
    history, hand, _ = reference
    first = history[0]
    assert hand["missing"] >= 1  # the masked attribute is exercised
    assert math.isclose(first["loss"], hand["loss"], rel_tol=1e-5)
    for key in ("rmse/help", "rmse/correct", "rmse/verbose", "pearson/help", "pearson/verbose"):
        assert math.isclose(first[key], hand[key], rel_tol=1e-5), key
    assert history[1]["loss"] != first["loss"]


@pytest.mark.slow
@pytest.mark.parametrize("world, overrides", [
    pytest.param(2, ("parallel.tensor_model_parallel_size=2",), id="tp2"),
    pytest.param(2, ("parallel.pipeline_model_parallel_size=2",), id="pp2"),
    pytest.param(2, (), id="dp2"),  # 2 micro-batches per rank: accumulation
    pytest.param(2, ("parallel.use_distributed_optimizer=true",), id="dp2-distopt"),
    pytest.param(1, ("data.packing=true", "data.packed_format=thd"), id="thd"),
])
def test_regression_under_tp2_dp2_and_packing_equals_one_process(world, overrides, reference):
    expected, _, full = reference
    for history, *_ in run_distributed(_train_regression, world, overrides, full):
        # The first step to the 1e-6; every step after within 1e-5.
        for key in ("loss", "grad_norm"):
            assert math.isclose(history[0][key], expected[0][key], rel_tol=1e-6), (key, history[0])
        for got, want in zip(history, expected, strict=True):
            for key in ("loss", "grad_norm", "rmse/help", "pearson/correct"):
                assert math.isclose(got[key], want[key], rel_tol=1e-5), (key, got, want)


def test_label_config_errors_name_the_key_and_fix():
    from megarm.config.checks import validate

    def keys(*over: str) -> set[str]:
        return {i.key for i in validate(tiny_config(*over))}

    assert not keys("training.objective=regression", "model.num_labels=3")
    assert keys("model.num_labels=3") == {"model.num_labels"}  # objective rm
    assert keys("training.objective=regression", "model.num_labels=2",
                "model.label_names=a,b,c") == {"model.label_names"}
    for bad in ("1,2", "1,-1,1", "0,0,0", "1,x,1"):
        assert keys("training.objective=regression", "model.num_labels=3",
                    f"training.label_weights={bad}") == {"training.label_weights"}, bad
