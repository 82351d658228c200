"""Training under TP / PP / DP / gradient accumulation equals the TP=1 full batch."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megarm.testing import free_port, run_distributed
from tests.helpers import load_full_state, randomize_, tiny_config

ROOT = Path(__file__).resolve().parents[1]
BASE = (
    "training.global_batch_size=8",
    "training.micro_batch_size=2",
    "training.train_iters=10",
    "training.eval_interval=0",
    "data.synthetic_num_pairs=96",
    "data.seq_length=24",
    "data.split=100,0,0",
    "optimizer.lr=1e-3",
    "optimizer.lr_warmup_fraction=0.2",
    "optimizer.clip_grad=1.0",
    "logging.log_dir=null",
)


def _train(overrides: tuple[str, ...], full: dict[str, torch.Tensor] | None):
    """Train 10 iterations from known weights; return history (+ weights, hand loss)."""
    from megarm import distributed
    from megarm.training.data import micro_batches
    from megarm.training.loop import Trainer

    cfg = tiny_config(*BASE, *overrides)
    distributed.init_from_config(cfg)
    trainer = Trainer(cfg)
    hand_loss = None
    if full is None:  # the reference run: make the weights, and a hand-computed loss
        full = randomize_(trainer.model[0].module.state_dict())
        load_full_state(trainer, full)
        model = trainer.model[0].module
        rewards_c, rewards_r, margins = [], [], []
        stream = micro_batches(trainer.data.train, cfg, 0, 0, 1)
        with torch.no_grad():
            for _ in range(trainer.num_microbatches):
                batch = next(stream)
                r = model(batch.tokens, batch.position_ids, None, batch.reward_index)
                rewards_c.append(r[: batch.num_pairs])
                rewards_r.append(r[batch.num_pairs :])
                margins.append(batch.margin)
        diff = torch.cat(rewards_c) - torch.cat(rewards_r) - torch.cat(margins)
        hand_loss = float((-torch.log(1.0 / (1.0 + torch.exp(-diff.double())))).mean())
    else:
        load_full_state(trainer, full)
    trainer.train()
    history = [{k: h[k] for k in ("loss", "grad_norm", "accuracy")} for h in trainer.history]
    return history, full, hand_loss


@pytest.fixture(scope="module")
def reference():
    ((history, full, hand_loss),) = run_distributed(_train, 1, (), None)
    return history, full, hand_loss


def test_first_loss_is_the_hand_computed_bradley_terry_loss(reference):
    history, _, hand_loss = reference
    assert math.isclose(history[0]["loss"], hand_loss, rel_tol=1e-6)
    # The run learns something: the loss moves over 10 iterations.
    assert history[-1]["loss"] < history[0]["loss"]


LAYOUTS = [
    pytest.param(2, ("parallel.tensor_model_parallel_size=2",), id="tp2"),
    pytest.param(2, ("parallel.pipeline_model_parallel_size=2",), id="pp2"),
    pytest.param(2, (), id="dp2", marks=pytest.mark.slow),
    pytest.param(1, ("training.micro_batch_size=1",), id="grad-accumulation", marks=pytest.mark.slow),
    pytest.param(
        2,
        ("parallel.use_distributed_optimizer=true", "training.micro_batch_size=1"),
        id="dp2-distopt",
        marks=pytest.mark.slow,
    ),
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
    pytest.param(1, ("model.recompute_granularity=selective",), id="selective-recompute",
                 marks=pytest.mark.slow),
    pytest.param(
        1,
        ("model.recompute_granularity=full", "model.recompute_method=uniform",
         "model.recompute_num_layers=2"),
        id="full-recompute",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        2,
        ("parallel.pipeline_model_parallel_size=2", "model.recompute_granularity=full",
         "model.recompute_method=block", "model.recompute_num_layers=1"),
        id="pp2-block-recompute",
        marks=pytest.mark.slow,
    ),
]


@pytest.mark.parametrize("world, overrides", LAYOUTS)
def test_layout_trains_like_tp1(reference, world, overrides):
    expected, full, _ = reference
    results = run_distributed(_train, world, overrides, full)
    for history, _, _ in results:  # every rank reports the same, DP-reduced metrics
        first, ref = history[0], expected[0]
        assert math.isclose(first["loss"], ref["loss"], rel_tol=1e-6)
        assert math.isclose(first["grad_norm"], ref["grad_norm"], rel_tol=1e-6)
        for got, want in zip(history, expected, strict=True):
            assert abs(got["loss"] - want["loss"]) < 1e-4


@pytest.mark.slow
def test_two_rank_run_from_shipped_config_learns(tmp_path):
    """torchrun + configs/orm_trainer_tiny.yaml: validation accuracy well above chance."""
    log_dir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(free_port()), "-m", "megarm.train",
        "--config", str(ROOT / "configs/orm_trainer_tiny.yaml"),
        f"logging.log_dir={log_dir}",
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in records if r["split"] == "valid"]
    train = [r for r in records if r["split"] == "train"]
    assert valid and valid[-1]["accuracy"] >= 0.9
    assert train[-1]["loss"] < 0.5 * train[0]["loss"]
    assert list((log_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (log_dir / "config.yaml").is_file()
    assert "[train] iteration" in done.stdout


@pytest.mark.parametrize(
    "world, overrides",
    [
        pytest.param(2, ("parallel.tensor_model_parallel_size=2",), id="tp2",
                     marks=pytest.mark.slow),
        pytest.param(2, ("parallel.pipeline_model_parallel_size=2",), id="pp2",
                     marks=pytest.mark.slow),
    ],
)
def test_bf16_trains_like_fp32(reference, world, overrides):
    """bf16 parameters with fp32 main weights (megatron-core's mixed-precision
    optimizer, the GPU default) from the same weights as the fp32 TP=1 run."""
    expected, full, _ = reference
    results = run_distributed(_train, world, (*overrides, "model.params_dtype=bf16"), full)
    history = results[-1][0]
    first, ref = history[0]["loss"], expected[0]["loss"]
    assert math.isclose(first, ref, rel_tol=1e-2)
    for got, want in zip(history, expected, strict=True):
        assert math.isclose(got["loss"], want["loss"], rel_tol=2e-2)
    assert history[-1]["loss"] < history[0]["loss"]
