"""The MFU formula: hand-counted FLOPs, no logits term; the benchmark tool runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megarm.config import load_config
from megarm.testing import free_port
from megarm.training.flops import matmul_parameters, peak_tflops, training_flops

ROOT = Path(__file__).resolve().parents[1]


def test_matmul_parameters_of_qwen25_7b_shape():
    cfg = load_config(ROOT / "configs/orm_trainer_qwen25_7b.yaml")
    h, f, layers = 3584, 18944, 28
    qkv = h * (28 + 2 * 4) * 128  # 28 query heads + 4 K + 4 V heads of 128 channels
    per_layer = qkv + h * h + 3 * h * f
    assert matmul_parameters(cfg) == layers * per_layer + h
    # ~6.5B: the 7.6B model minus its embedding and LM head (0.54B each), plus the head.
    assert 6.4e9 < matmul_parameters(cfg) < 6.6e9


def test_matmul_parameters_of_a_mixture_of_experts_count_active_experts(tmp_path):
    """Qwen3-30B-A3B: the router, 8 of 128 experts of 768; "A3B" is 3.3B activated
    parameters with the embedding and LM head (0.31B each); Qwen2-MoE adds its
    shared expert and gate."""
    from tests.test_families import QWEN3_30B_A3B, write_config

    hf = write_config(tmp_path / "a3b", QWEN3_30B_A3B)
    cfg = load_config(None, [f"model.hf_config={hf}"])
    h = 2048
    per_layer = h * (32 + 2 * 4) * 128 + 32 * 128 * h + h * (128 + 3 * 8 * 768)
    assert matmul_parameters(cfg) == 48 * per_layer + h
    assert 3.2e9 < matmul_parameters(cfg) + 2 * 151936 * h < 3.4e9
    moe = load_config(None, ["model.family=qwen2_moe", "model.num_moe_experts=4",
                             "model.moe_ffn_hidden_size=32", "model.moe_router_topk=2",
                             "model.moe_shared_expert_intermediate_size=96"])
    dense = load_config(None, ["model.family=qwen2"])
    mlp = 64 * (4 + 3 * 2 * 32 + 3 * 96 + 1) - 3 * 64 * 128
    assert matmul_parameters(moe) - matmul_parameters(dense) == 2 * mlp


def test_training_flops_counts_attention_per_sequence_and_no_logits():
    cfg = load_config(None, ["model.num_layers=2", "model.hidden_size=64",
                             "model.ffn_hidden_size=128", "model.num_attention_heads=4",
                             "model.num_query_groups=2"])
    n = 2 * (64 * (4 + 4) * 16 + 64 * 64 + 3 * 64 * 128) + 64
    lengths = [10, 30]
    tokens, tokens_sq = sum(lengths), sum(s * s for s in lengths)
    expected = 6 * n * tokens + 12 * 2 * 64 * tokens_sq
    assert training_flops(cfg, tokens, tokens_sq) == expected
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and peak_tflops("cpu") is None


@pytest.mark.slow
def test_benchmark_tool_reports_json():
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
         "--master_port", str(free_port()), "tools/benchmark_train.py",
         "--config", "configs/orm_trainer_tiny.yaml", "parallel.tensor_model_parallel_size=1",
         "training.train_iters=5", "--warmup", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("{"))
    result = json.loads(line)
    assert result["iterations_timed"] == 3 and result["tokens_per_s"] > 0
    assert result["device"] == "cpu" and result["mfu"] is None
    # the real tokens of a micro-batch, at most the rows x seq_length it was sized for
    assert 0 < result["stream_tokens"] <= result["estimate_stream_tokens"]
    assert result["peak_memory_gib"] == result["peak_reserved_gib"] == 0  # CPU: unknown
    # steady-state figures tools/compare_trl.py reads
    assert 0 < result["iteration_time_median_s"] < 60
    assert result["model_flops_per_iteration"] == pytest.approx(
        result["tflops_per_device"] * 1e12 * result["iteration_time_s"], rel=1e-6)


@pytest.mark.slow
def test_profile_tool_reports_phases():
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
         "--master_port", str(free_port()), "tools/profile_step.py",
         "--config", "configs/orm_trainer_tiny.yaml", "parallel.tensor_model_parallel_size=1",
         "training.train_iters=6", "--warmup", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(x for x in done.stdout.splitlines() if x.startswith("{")))
    phases = ("zero", "forward_backward", "grad_norm", "clip", "adam")
    assert result["iterations_timed"] == 4
    assert all(result[f"{p}_ms"] > 0 for p in phases)
    # the phases are parts of the step (medians: allow a little slack)
    assert sum(result[f"{p}_ms"] for p in phases) < 1.2 * result["step_ms"]
