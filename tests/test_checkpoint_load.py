"""Weights saved at one layout load at another; a mismatched model is refused."""

from __future__ import annotations

import pytest
import torch

from megarm.testing import run_distributed
from tests.helpers import assert_rewards_close, pair_batch, tiny_config

BASE = (
    "training.global_batch_size=4",
    "training.train_iters=2",
    "data.synthetic_num_pairs=32",
    "data.split=100,0,0",
    "optimizer.lr=1e-2",
)


def _train_and_save(save_dir: str, overrides: tuple[str, ...]):
    from megarm import distributed
    from megarm.training.loop import Trainer

    cfg = tiny_config(*BASE, f"checkpoint.save={save_dir}", *overrides)
    distributed.init_from_config(cfg)
    trainer = Trainer(cfg)
    trainer.train()
    return _rewards(trainer)


def _load_and_score(load_dir: str, overrides: tuple[str, ...]):
    from megarm import distributed
    from megarm.training.loop import Trainer

    cfg = tiny_config(*BASE, f"checkpoint.load={load_dir}", *overrides)
    distributed.init_from_config(cfg)
    trainer = Trainer(cfg)
    return _rewards(trainer)


def _rewards(trainer):
    batch = pair_batch(2, 16, 250, seed=3)
    for chunk in trainer.model:
        chunk.eval()
    with torch.no_grad():
        outputs = trainer.run_schedule([batch], forward_only=True)
    return [out["rewards"] for out in outputs]


def _weights_only(load_dir: str):
    """Load weights only (no saved config: the tensor-shape check must catch it)."""
    from megarm import distributed
    from megarm.checkpoint import CheckpointMismatchError, load_model_weights
    from megarm.model.builder import build_model

    distributed.init()
    chunks = build_model(tiny_config("model.hidden_size=96"))
    try:
        load_model_weights(load_dir, chunks)
    except CheckpointMismatchError as exc:
        return str(exc)
    return None


def _expect_mismatch(load_dir: str):
    from megarm import distributed
    from megarm.checkpoint import CheckpointMismatchError
    from megarm.training.loop import Trainer

    cfg = tiny_config(*BASE, f"checkpoint.load={load_dir}", "model.hidden_size=96")
    distributed.init()
    try:
        Trainer(cfg)
    except CheckpointMismatchError as exc:
        return str(exc)
    return None


@pytest.mark.slow
def test_saved_at_tp2_loads_at_tp1_and_pp2(tmp_path):
    save = str(tmp_path / "ckpt")
    ranks = run_distributed(_train_and_save, 2, save, ("parallel.tensor_model_parallel_size=2",))
    expected = ranks[0][0]
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert (tmp_path / "ckpt" / "iter_0000002").is_dir()
    assert not list((tmp_path / "ckpt").glob("*.tmp"))
    (tp1,) = run_distributed(_load_and_score, 1, save, ())
    assert_rewards_close(tp1[0], expected)
    pp2 = run_distributed(_load_and_score, 2, save, ("parallel.pipeline_model_parallel_size=2",))
    assert_rewards_close(pp2[1][0], expected)
    # A different shape is refused before loading, naming the key and both values.
    (message,) = run_distributed(_expect_mismatch, 1, save)
    assert message is not None
    assert "model.hidden_size=64" in message and "model.hidden_size=96" in message
    # Without a saved config, the first mismatching tensor is named with both shapes.
    (message,) = run_distributed(_weights_only, 1, save)
    assert message is not None
    assert "decoder.final_layernorm.weight" in message
    assert "(64,)" in message and "(96,)" in message
