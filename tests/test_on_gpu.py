"""What only a GPU can prove, in a few minutes (``pytest -m gpu``, run by
``tools/gpu_check.sh``): rewards equal transformers' on the device (fp32 with TF32
off and bf16, padded and THD-packed, relative tolerances), TP=2 over gloo on one GPU
equals TP=1, and training as the benchmark runs it (bf16, packed, the distributed
optimizer, forward, backward and step) reduces the loss and resumes bit for bit with
strict deterministic kernels.

Skipped without CUDA, except under ``MEGARM_GPU_CHECK_CPU=1`` (what
``tools/gpu_check.sh --dry-run`` sets): then the same steps run on CPU, so the check
cannot rot between the rare GPU sessions.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from megarm.testing import run_distributed
from tests.test_convert import token_batch

ON_CPU = os.environ.get("MEGARM_GPU_CHECK_CPU") == "1"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (torch.cuda.is_available() or ON_CPU),
        reason="needs a GPU (or MEGARM_GPU_CHECK_CPU=1: tools/gpu_check.sh --dry-run)",
    ),
]
PAD_ID = 151643  # Qwen2.5's pad token, as in tests.test_convert's batches
# bf16 rewards against transformers in bf16: 1% of the largest |reward| (measured on
# CPU: 0.62%, tests/test_bf16.py); the device's kernels may order sums differently.
BF16_RTOL = 0.01
# fp32, relative to the largest |reward| (rewards reach ~10): cuBLAS picks different
# GEMM algorithms for different shapes (padded rows vs a packed stream, TP shards), so
# sums are ordered differently; an absolute 1e-5 would flake. TF32 is off (checked).
FP32_RTOL = 1e-4


def _close(mine: torch.Tensor, theirs: torch.Tensor, rtol: float) -> None:
    """``mine`` within ``rtol`` of the largest |``theirs``|, elementwise."""
    worst = (mine.float() - theirs.float()).abs().max().item()
    assert worst <= rtol * theirs.float().abs().max().item(), (worst, mine, theirs)


def _exact_fp32() -> None:
    """fp32 matmuls and convolutions in full fp32 (no TF32), in this process."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32


@pytest.fixture(autouse=True)
def _no_tf32():
    """TF32 off in the test process too (the transformers side runs here)."""
    _exact_fp32()


def _megarm_rewards(mcore_dir: str, tp: int, dtype: str, packed: str | None = None,
                    cp: int = 1, attention: str = "auto") -> list:
    """Rewards of the right- and left-padded batches on this rank's device; with
    ``packed`` the right-padded rows also go through a packed layout. The last entry
    is the core attention's class name (TE's, or megarm's SDPA)."""
    from megarm import distributed
    from megarm.checkpoint import load_model_weights
    from megarm.config import load_config
    from megarm.model.builder import build_model
    from megarm.model.masks import padding_attention_mask
    from megarm.rewards.batches import ScoreBatch, run_model
    from tests.helpers import last_valid_index

    _exact_fp32()
    cfg = load_config(None, [f"model.hf_config={mcore_dir}", f"model.params_dtype={dtype}",
                             f"parallel.tensor_model_parallel_size={tp}", "data.seq_length=64",
                             f"parallel.context_parallel_size={cp}",
                             f"model.attention_backend={attention}"])
    distributed.init(tp, 1, context_parallel_size=cp)
    model = build_model(cfg)
    load_model_weights(mcore_dir, model)
    out = []
    for left in (False, True):
        tokens, valid = token_batch(left)
        batch = ScoreBatch(
            tokens=tokens,
            position_ids=torch.arange(tokens.shape[1]).expand_as(tokens).contiguous(),
            reward_index=last_valid_index(valid),
            rows=torch.arange(tokens.shape[0]),
            attention_mask=padding_attention_mask(valid) if left else None,
        )
        found = run_model(model, [batch])
        out.append(torch.tensor([found[r] for r in range(tokens.shape[0])]) if found else None)
    if packed:
        out.append(_packed_rewards(model[0], packed))
    core = model[0].decoder.layers[0].self_attention.core_attention
    return [*out, type(core).__name__]


def _packed_rewards(model: torch.nn.Module, layout: str) -> torch.Tensor:
    """The right-padded rows as pairs, packed (``thd`` or ``rows``), rewards in row order."""
    import numpy as np

    from megarm import platform
    from megarm.data.packing import collate_packed, collate_thd
    from megarm.training.data import to_pair_batch

    tokens, valid = token_batch(False)
    rows = [tokens[i, : int(valid[i].sum())].numpy() for i in range(tokens.shape[0])]
    half = len(rows) // 2
    samples = [
        {"chosen_input_ids": rows[i], "chosen_labels": np.full_like(rows[i], -100),
         "rejected_input_ids": rows[half + i], "rejected_labels": np.full_like(rows[half + i], -100),
         "margin": 0.0}
        for i in range(half)
    ]
    if layout == "thd":
        collated = collate_thd(samples, pad_token_id=PAD_ID)
    else:
        collated = collate_packed(samples, pad_token_id=PAD_ID, seq_length=32)
    batch = to_pair_batch(collated).to(platform.device())
    model.eval()
    with torch.no_grad():
        rewards = model(batch.tokens, batch.position_ids, batch.attention_mask, batch.reward_index,
                        reward_row=batch.reward_row, packed_seq_params=batch.packed_seq_params(),
                        plain_positions=False, max_position=batch.max_position)
    return rewards.float().cpu()


def _hf_rewards(export: Path, dtype: torch.dtype) -> list[torch.Tensor]:
    from transformers import AutoModelForSequenceClassification

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForSequenceClassification.from_pretrained(str(export), dtype=dtype).to(device)
    model.eval()
    out = []
    for left in (False, True):
        tokens, valid = token_batch(left)
        with torch.no_grad():
            logits = model(input_ids=tokens.to(device), attention_mask=valid.long().to(device)).logits
        out.append(logits[:, 0].float().cpu())
    return out


def test_rewards_equal_transformers_on_the_device(rm_export, rm_checkpoint):
    (fp32,) = run_distributed(_megarm_rewards, 1, str(rm_checkpoint), 1, "fp32", "thd")
    for mine, theirs in zip(fp32, _hf_rewards(rm_export, torch.float32), strict=False):
        _close(mine, theirs, FP32_RTOL)
    # Packed (THD, megarm's SDPA per segment) = padded on the device, fp32.
    _close(fp32[2], fp32[0], FP32_RTOL)
    # bf16, as the benchmark runs: padded and packed against transformers in bf16.
    (bf16,) = run_distributed(_megarm_rewards, 1, str(rm_checkpoint), 1, "bf16", "thd")
    hf_bf16 = _hf_rewards(rm_export, torch.bfloat16)
    for mine, theirs in zip(bf16, hf_bf16, strict=False):
        _close(mine, theirs, BF16_RTOL)
    _close(bf16[2], hf_bf16[0], BF16_RTOL)


def test_tp2_over_gloo_on_one_device_equals_tp1(rm_checkpoint):
    (tp1,) = run_distributed(_megarm_rewards, 1, str(rm_checkpoint), 1, "fp32")
    ranks = run_distributed(_megarm_rewards, 2, str(rm_checkpoint), 2, "fp32",
                            env={"MEGARM_DIST_BACKEND": "gloo"})
    tp2 = next(r for r in ranks if r[0] is not None)
    for a, b in zip(tp2[:-1], tp1[:-1], strict=True):
        _close(a, b, FP32_RTOL)


@pytest.mark.parametrize("attention", ["sdpa", "auto"])
def test_cp2_over_gloo_on_one_device_equals_cp1(rm_checkpoint, attention, record_property):
    """Context parallelism on the device: megarm's SDPA path (all-gathered K/V), and
    with ``auto`` transformer-engine's own CP attention where TE is installed (the
    class that ran is recorded in tests.xml)."""
    (cp1,) = run_distributed(_megarm_rewards, 1, str(rm_checkpoint), 1, "fp32")
    ranks = run_distributed(_megarm_rewards, 2, str(rm_checkpoint), 1, "fp32", None, 2, attention,
                            env={"MEGARM_DIST_BACKEND": "gloo"})
    record_property("core_attention", ranks[0][-1])
    cp2 = ranks[0]  # CP rank 0 reports the rewards (both ranks hold them)
    assert ranks[1][0] is None
    for a, b in zip(cp2[:-1], cp1[:-1], strict=True):
        _close(a, b, FP32_RTOL)


def _train(overrides: tuple[str, ...]) -> list[float]:
    from megarm import distributed
    from megarm.config import load_config
    from megarm.training.loop import Trainer

    # The CPU dry run (tools/gpu_check.sh --dry-run, in the suite) trains on half as
    # long sides: the same steps, at half the cost.
    seq = 512 if torch.cuda.is_available() else 256
    cfg = load_config(None, [
        "model.num_layers=2", "model.hidden_size=128", "model.ffn_hidden_size=256",
        "model.num_attention_heads=4", "model.num_query_groups=2", "model.vocab_size=1024",
        "model.max_position_embeddings=1024", "model.params_dtype=bf16",
        # what the benchmark runs: bf16, THD-packed, the distributed optimizer, and
        # sequences long enough (up to 512 tokens: streams of ~2k) that a
        # non-deterministic attention backward would show in the resume
        f"data.seq_length={seq}", "data.packing=true", "parallel.use_distributed_optimizer=true",
        "data.synthetic_num_pairs=512", "data.split=100,0,0", "training.micro_batch_size=4",
        "training.global_batch_size=16", "training.train_iters=20", "training.deterministic=true",
        "optimizer.lr=2e-3", "optimizer.lr_warmup_fraction=0.1", "logging.log_dir=null",
        *overrides,
    ])
    assert cfg.data.packing and cfg.parallel.use_distributed_optimizer
    distributed.init_from_config(cfg)
    trainer = Trainer(cfg)
    trainer.train()
    trainer.close()
    if torch.cuda.is_available():  # strict deterministic kernels on the device
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
    assert min(h["tokens"] for h in trainer.history) > 16 * 2 * seq // 5  # long sides, not toy ones
    return [h["loss"] for h in trainer.history]


def test_training_learns_and_resumes_bit_for_bit(tmp_path):
    save = f"checkpoint.save={tmp_path / 'ckpt'}"
    (straight,) = run_distributed(_train, 1, ())
    assert len(straight) == 20 and sum(straight[-5:]) < 0.5 * sum(straight[:5])
    (first,) = run_distributed(_train, 1, (save, "training.exit_interval=10"))
    (second,) = run_distributed(_train, 1, (save, f"checkpoint.load={tmp_path / 'ckpt'}"))
    assert first == straight[:10]
    assert second == straight[10:]  # bit for bit
