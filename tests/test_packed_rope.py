"""RoPE on the THD path from cos/sin computed once per micro-batch (issue 30)
equals megatron-core's per-layer THD RoPE bitwise: rewards, loss and every
gradient at (1,1); the training history under TP=2 (slow)."""

from __future__ import annotations

import pytest
import torch

from megarm.testing import run_distributed
from tests.helpers import randomize_, tiny_config


def _forward_backward() -> tuple[bool, list, list]:
    """One THD micro-batch, forward + backward, with SDPAttention's RoPE and with
    megatron-core's; returns whether the model chose SDPAttention's, and both
    results."""
    from megarm import distributed
    from megarm.data.packing import collate_thd
    from megarm.data.synthetic import SyntheticPairs
    from megarm.model.builder import build_model
    from megarm.model.step import forward_step
    from megarm.training.data import to_pair_batch
    from megarm.training.loss import loss_func

    cfg = tiny_config("data.seq_length=64", "model.max_position_embeddings=128")
    distributed.init(seed=cfg.training.seed)
    (model,) = build_model(cfg)
    model.load_state_dict(randomize_(model.state_dict()))
    data = SyntheticPairs(8, 250, 40, seed=5)
    batch = to_pair_batch(collate_thd([data[i] for i in range(4)], 0))
    assert len(batch.seq_lengths) == 8 and batch.max_seqlen > 8
    chosen = model.rope_in_sdpa
    results = []
    for flag in (False, True):
        model.rope_in_sdpa = flag
        model.zero_grad(set_to_none=True)
        rewards, loss_fn = forward_step(iter([batch]), model, loss_func)
        loss, _ = loss_fn(rewards)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((rewards.detach(), loss.detach(), grads))
    return chosen, results[0], results[1]


def test_packed_rope_once_per_micro_batch_is_bitwise_equal():
    ((chosen, old, new),) = run_distributed(_forward_backward, 1)
    assert chosen  # the local SDPA spec on CPU takes the new path by default
    assert torch.equal(old[0], new[0]) and torch.equal(old[1], new[1])
    assert old[2].keys() == new[2].keys() and len(old[2]) > 10
    for name in old[2]:
        assert torch.equal(old[2][name], new[2][name]), name
    # RoPE matters here: rewards differ from a run without any rotation.
    assert old[0].abs().sum() > 0


def _train_with_rope(overrides: tuple[str, ...], rope_in_sdpa: bool) -> list[dict]:
    """10 iterations of tests.test_training's setup (seeded init) with the RoPE path
    forced; the metrics history."""
    from megarm import distributed
    from megarm.model import reward_model
    from megarm.training.loop import Trainer
    from tests.test_training import BASE

    if not rope_in_sdpa:
        reward_model.rope_in_sdpa = lambda config: False
    cfg = tiny_config(*BASE, *overrides)
    distributed.init_from_config(cfg)
    trainer = Trainer(cfg)
    assert trainer.model[0].module.rope_in_sdpa is rope_in_sdpa
    trainer.train()
    return [{k: h[k] for k in ("loss", "grad_norm", "accuracy")} for h in trainer.history]


@pytest.mark.slow
def test_tp2_thd_training_is_bitwise_equal():
    layout = ("data.packing=true", "data.packed_format=thd", "parallel.tensor_model_parallel_size=2")
    old = run_distributed(_train_with_rope, 2, layout, False)
    new = run_distributed(_train_with_rope, 2, layout, True)
    assert new == old
    assert old[0][-1]["loss"] < old[0][0]["loss"]
