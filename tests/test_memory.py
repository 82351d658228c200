"""The memory estimator's model-state bytes equal what a run really holds (CPU, fp32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megarm.config import load_config
from megarm.testing import run_distributed
from megarm.training.memory import estimate, largest_micro_batch
from tests.helpers import tiny_config

ROOT = Path(__file__).resolve().parents[1]
SHAPE = ("model.hidden_size=128", "model.ffn_hidden_size=256", "model.vocab_size=1000",
         "training.global_batch_size=4", "training.micro_batch_size=1",
         "training.train_iters=1", "data.synthetic_num_pairs=16", "data.split=100,0,0")


def _held_bytes(overrides: tuple[str, ...]):
    from megatron.core import parallel_state as ps

    from megarm import distributed
    from megarm.training.loop import Trainer

    cfg = tiny_config(*SHAPE, *overrides)
    distributed.init_from_config(cfg)
    trainer = Trainer(cfg)
    trainer.train()  # one step, so the optimizer state exists
    weights = sum(x.numel() * x.element_size() for m in trainer.model for x in m.module.parameters())
    grads = sum(b.grad_data.numel() * b.grad_data.element_size()  # experts: a buffer of their own
                for m in trainer.model for b in [*m.buffers, *m.expert_parallel_buffers])
    optim = 0
    for inner in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
        for state in inner.optimizer.state.values():
            optim += sum(v.numel() * v.element_size() for k, v in state.items()
                         if k != "step" and isinstance(v, torch.Tensor))
    return ps.get_pipeline_model_parallel_rank(), weights, grads, optim


@pytest.mark.parametrize("world, overrides", [
    pytest.param(1, (), id="tp1"),
    pytest.param(2, ("parallel.tensor_model_parallel_size=2",), id="tp2", marks=pytest.mark.slow),
    pytest.param(2, ("parallel.pipeline_model_parallel_size=2",), id="pp2",
                 marks=pytest.mark.slow),
    pytest.param(2, ("parallel.use_distributed_optimizer=true",), id="dp2-distopt",
                 marks=pytest.mark.slow),
    # Experts split by EP=2 and their optimizer states unsharded (expert-data-parallel
    # size 1), the rest sharded over DP=2.
    pytest.param(2, ("model.family=qwen3_moe", "model.num_moe_experts=4", "model.moe_ffn_hidden_size=64",
                     "model.moe_norm_topk_prob=true", "parallel.expert_model_parallel_size=2",
                     "parallel.use_distributed_optimizer=true"), id="ep2-distopt",
                 marks=pytest.mark.slow),
])
def test_model_state_estimate_matches_held_bytes(world, overrides):
    cfg = tiny_config(*SHAPE, *overrides)
    for pp_rank, weights, grads, optim in run_distributed(_held_bytes, world, overrides):
        est = estimate(cfg, world, cuda=False, pp_rank=pp_rank)
        assert est.weights == pytest.approx(weights, rel=0.01)
        assert est.gradients == pytest.approx(grads, rel=0.01)
        assert est.optimizer == pytest.approx(optim, rel=0.01)


def test_bf16_bytes_per_parameter_follow_the_rule():
    cfg = load_config(None, ["model.params_dtype=bf16"])
    est = estimate(cfg, 8, cuda=True)
    assert est.model_states == 18 * est.parameters  # 2 + 4 + 12
    cfg = load_config(None, ["model.params_dtype=bf16", "parallel.use_distributed_optimizer=true"])
    est = estimate(cfg, 8, cuda=True)
    assert est.model_states == pytest.approx((6 + 12 / 8) * est.parameters, rel=1e-6)


def test_activations_follow_korthikanti_and_fit_search():
    base = ["model.num_layers=4", "model.hidden_size=1024", "model.num_attention_heads=16",
            "model.num_query_groups=4", "model.ffn_hidden_size=4096", "data.seq_length=2048",
            "training.micro_batch_size=1", "model.params_dtype=bf16",
            "parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]
    s, b, h, t, layers = 2048, 2, 1024, 2, 4
    cfg = load_config(None, base)
    assert estimate(cfg, 2).activations == int(34 * s * b * h / t * layers)
    cfg = load_config(None, [*base, "model.recompute_granularity=full"])
    assert estimate(cfg, 2).activations == int(2 * s * b * h / t * layers)
    cfg = load_config(None, [*base, "model.attention_backend=unfused"])
    assert estimate(cfg, 2).activations == int(s * b * h * (34 + 5 * 16 * s / h) / t * layers)
    fits = largest_micro_batch(load_config(None, base), 2, gpu_gib=4.0)
    one = estimate(load_config(None, base), 2)
    per_pair = one.activations
    assert fits == int((4 * 2**30 - one.model_states) // per_pair)


@pytest.mark.slow
def test_training_and_save_peaks_are_estimated(tmp_path):
    """tools/benchmark_save_memory.py on a 108M-parameter model (CPU, fp32, one rank):
    the measured peak RSS of the iterations and of the save (VmHWM reset before it)
    against the estimate printed at the start of every run."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from megarm.testing import free_port

    root = Path(__file__).resolve().parents[1]
    shape = ["model.num_layers=8", "model.hidden_size=512", "model.ffn_hidden_size=2048",
             "model.num_attention_heads=8", "model.num_query_groups=2", "model.vocab_size=151936",
             "model.max_position_embeddings=1024", "model.params_dtype=fp32",
             "data.seq_length=256", "data.synthetic_num_pairs=64", "training.micro_batch_size=1",
             "training.global_batch_size=2", "training.train_iters=3", "logging.log_dir=null",
             "data.allow_synthetic=true", "checkpoint.allow_random_init=true",
             f"checkpoint.save={tmp_path / 'ckpt'}"]
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
         str(free_port()), str(root / "tools/benchmark_save_memory.py"), *shape],
        capture_output=True, text=True, cwd=root, timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root)),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    row = [json.loads(x) for x in done.stdout.splitlines() if x.startswith('{"label"')][0]
    est = row["estimate"]
    measured_training = row["peak_training_gib"] * 2**30
    measured_save = row["peak_during_save_gib"] * 2**30
    assert est["training_peak"] == pytest.approx(measured_training, rel=0.15)
    # A save's peak is set by how much heap glibc still holds, which varies more from
    # run to run (2.61-2.80 GiB here; 0.5B at TP=2 is within 5%, docs/BENCHMARKS.md).
    assert est["save_peak"] == pytest.approx(measured_save, rel=0.2)


# tools/gpu_check.sh's 3B benchmark: Qwen2.5-3B at TP=1, bf16, 16 pairs per micro-batch,
# seq_length 4096 as a cap, THD-packed.
BENCH_3B = ["parallel.tensor_model_parallel_size=1", "parallel.sequence_parallel=false",
            "model.params_dtype=bf16", "data.seq_length=4096", "data.packing=true",
            "training.micro_batch_size=16", "training.global_batch_size=64",
            "data.allow_synthetic=true", "checkpoint.allow_random_init=true"]
# Qwen2.5-3B by hand: embedding 151936 x 2048 (tied), 36 layers of qkv (16 + 2 x 2) x 128
# x 2048 + bias 2560, o 2048 x 2048, MLP 3 x 2048 x 11008, two norms; final norm, value head.
P_3B = 151936 * 2048 + 36 * (2560 * 2048 + 2560 + 2048 * 2048 + 3 * 2048 * 11008 + 2 * 2048) + 2 * 2048


def _config_3b(tmp_path, *extra: str):
    return load_config(str(ROOT / "configs/orm_trainer_qwen25_3b.yaml"), [*BENCH_3B, *extra])


def test_packed_3b_benchmark_is_sized_from_the_data_lengths(tmp_path):
    import json

    from megarm.training.memory import stream_tokens

    # Without length statistics the stream can reach its cap: 2 x 16 x 4096 tokens.
    cfg = _config_3b(tmp_path)
    capped = estimate(cfg, 1, cuda=True)
    assert capped.parameters == P_3B == 3_085_940_736
    assert capped.stream_tokens == 131_072
    assert capped.activations == 131_072 * 2048 * 34 * 36  # 306.0 GiB
    # With the data's statistics (illustrative HH-RLHF-like 90th percentiles: chosen
    # 330, rejected 320 tokens): 16 x (330 + 320) = 10,400 tokens.
    prefix = tmp_path / "pairs"
    (tmp_path / "pairs_stats.json").write_text(json.dumps({"lengths": {
        "chosen": {"p50": 140.0, "p90": 330.0, "p99": 900.0, "max": 4096},
        "rejected": {"p50": 135.0, "p90": 320.0, "p99": 880.0, "max": 4096}}}))
    cfg = _config_3b(tmp_path, f"data.data_path={prefix}")
    assert stream_tokens(cfg, side_lengths={"chosen": {"p90": 330}, "rejected": {"p90": 320}}) == 10_400
    est = estimate(cfg, 1, cuda=True)
    assert est.stream_tokens == 10_400
    assert est.activations == 10_400 * 2048 * 34 * 36 == 26_070_220_800  # 24.28 GiB
    assert est.model_states == 18 * P_3B  # bf16 weights 2 + fp32 grads 4 + Adam 12: 51.73 GiB
    # torch's fused AdamW (megarm's choice without TE/apex): no step temporaries; the
    # unfused foreach one's fp32 temporary per parameter (11.50 GiB) is below the
    # activations, which are freed before the step, so the peak is the same
    assert est.step_transients == 0
    assert estimate(cfg, 1, cuda=True, fused_adam=False).step_transients == 4 * P_3B
    assert est.training_peak == 18 * P_3B + 26_070_220_800
    assert est.training_peak / 2**30 == pytest.approx(76.01, abs=0.01)  # was 357.73 GiB
    assert capped.training_peak / 2**30 == pytest.approx(357.73, abs=0.01)
    # padded, the same data still costs rows x seq_length
    padded = estimate(_config_3b(tmp_path, f"data.data_path={prefix}", "data.packing=false"), 1)
    assert padded.stream_tokens == 131_072


def test_step_temporaries_follow_the_optimizer_in_use():
    cfg = load_config(None, ["model.params_dtype=bf16", "training.micro_batch_size=1",
                             "data.seq_length=128"])
    torch_adamw = estimate(cfg, 1, cuda=True, fused_adam=False)
    fused = estimate(cfg, 1, cuda=True)  # the default: megarm selects a fused kernel
    cpu = estimate(cfg, 1, cuda=False, fused_adam=False)
    cpu_fused = estimate(cfg, 1, cuda=False)
    p = torch_adamw.parameters
    assert fused.step_transients == 0
    assert torch_adamw.step_transients == 4 * p  # the fp32 sqrt(exp_avg_sq) list
    assert cpu.step_transients == int(2.5 * 4 * p)  # measured on CPU
    assert cpu_fused.step_transients == int(1.7 * 4 * p)  # measured on CPU, torch's fused AdamW
    # short sequences: the step, not the activations, sets the peak without a fused Adam
    assert torch_adamw.activations < torch_adamw.step_transients
    assert torch_adamw.training_peak == torch_adamw.model_states + 4 * p
    assert fused.training_peak == fused.model_states + fused.activations
