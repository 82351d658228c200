"""TP / PP / sequence-parallel forwards equal the TP=1 forward on the same weights."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from megarm.testing import run_distributed
from tests.helpers import assert_rewards_close, pair_batch, randomize_, tiny_config


def _reference(overrides: tuple[str, ...]):
    """TP=1 PP=1: random-but-known weights and their rewards."""
    from megarm import distributed
    from megarm.model.builder import build_model
    from megarm.model.step import forward_step, reward_outputs

    cfg = tiny_config(*overrides)
    distributed.init(seed=cfg.training.seed)
    (model,) = build_model(cfg)
    full = randomize_(model.state_dict())
    model.load_state_dict(full)
    batch = pair_batch(3, 24, cfg.model.vocab_size, seed=1)
    with torch.no_grad():
        rewards, _ = forward_step(iter([batch]), model, reward_outputs)
    return full, rewards


def _sharded_rewards(overrides: tuple[str, ...], full: dict[str, torch.Tensor]):
    """Rewards at the layout ``overrides`` sets, through the pipeline schedule."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megarm import distributed
    from megarm.model.builder import build_model
    from megarm.model.sharding import load_full_state_dict
    from megarm.model.step import forward_step, reward_outputs

    cfg = tiny_config(*overrides)
    p = cfg.parallel
    distributed.init_from_config(cfg)
    chunks = build_model(cfg)
    load_full_state_dict(chunks, full, cfg)
    batch = pair_batch(3, 24, cfg.model.vocab_size, seed=1)
    nmb = 2 if p.virtual_pipeline_model_parallel_size else 1
    outputs = get_forward_backward_func()(
        forward_step_func=partial(forward_step, loss=reward_outputs),
        data_iterator=[iter([batch] * nmb) for _ in chunks] if len(chunks) > 1 else iter([batch]),
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=nmb,
        seq_length=24,
        micro_batch_size=6,
        forward_only=True,
    )
    return [out["rewards"] for out in outputs][:1]


@pytest.fixture(scope="module")
def reference():
    (result,) = run_distributed(_reference, 1, ())
    return result


LAYOUTS = [
    pytest.param(2, ("parallel.tensor_model_parallel_size=2",), id="tp2"),
    pytest.param(2, ("parallel.pipeline_model_parallel_size=2",), id="pp2"),
    pytest.param(
        2,
        ("parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"),
        id="tp2-sp",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        4,
        ("parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"),
        id="tp2-pp2",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        2,
        (
            "parallel.pipeline_model_parallel_size=2",
            "parallel.virtual_pipeline_model_parallel_size=2",
        ),
        id="pp2-vpp2",
        marks=pytest.mark.slow,
    ),
]


@pytest.mark.parametrize("world, overrides", LAYOUTS)
def test_layout_matches_tp1(reference, world, overrides):
    full, expected = reference
    per_rank = run_distributed(_sharded_rewards, world, overrides, full)
    got = [r for rank in per_rank for r in rank]
    assert got, "no rank returned rewards"
    for rewards in got:
        assert_rewards_close(rewards, expected)


def test_misplaced_weight_is_detected(reference):
    """The comparison has teeth: swapping two layers' weights changes the rewards."""
    full, expected = reference
    swapped = dict(full)
    a = "decoder.layers.0.mlp.linear_fc2.weight"
    b = "decoder.layers.1.mlp.linear_fc2.weight"
    swapped[a], swapped[b] = full[b], full[a]
    (got,) = run_distributed(_sharded_rewards, 1, (), swapped)
    assert (got[0] - expected).abs().max() > 1e-3
