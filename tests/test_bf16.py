"""bf16, the GPU default, on CPU: conversion keeps bf16 weights bit for bit, and a
converted model's rewards agree with transformers computing in bf16.

(Training in bf16 against fp32 is in test_training.py; bitwise resume in bf16 in
test_resume.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megarm.testing import run_distributed
from tests.test_convert import (
    hf2mcore,
    load_hf_tensors,
    make_hf,
    mcore2hf,
    token_batch,
)
from tests.test_on_gpu import _megarm_rewards

# Measured on the 12 rewards below (|r| up to 11.3): largest |megarm - transformers|
# 0.070 at TP=1 and 0.051 at TP=2, i.e. <= 0.62% of the largest reward. bf16 keeps 8
# mantissa bits: transformers' own bf16 logits come in steps of 0.0625 at |r| 8-16,
# while megarm's value head computes in fp32; attention and norms also differ in
# their order of operations. Tolerance: 1% of the largest |reward|.
BF16_RTOL = 0.01


@pytest.fixture(scope="module")
def bf16_hf(tmp_path_factory) -> Path:
    """A Qwen2ForSequenceClassification stored in bf16."""
    from transformers import AutoModelForSequenceClassification

    fp32 = make_hf(tmp_path_factory.mktemp("hf32") / "seq", "seq", seed=3)
    model = AutoModelForSequenceClassification.from_pretrained(str(fp32), dtype=torch.bfloat16)
    out = tmp_path_factory.mktemp("hf16") / "seq"
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def bf16_mcore(bf16_hf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mcore16") / "seq"
    # hf2mcore() passes --params-dtype fp32; the last flag wins.
    hf2mcore(bf16_hf, out, "--params-dtype", "bf16")
    return out


@pytest.mark.slow
def test_bf16_round_trip_is_bit_identical(bf16_hf, bf16_mcore, tmp_path):
    back = tmp_path / "back"
    mcore2hf(bf16_mcore, back)
    original, exported = load_hf_tensors(bf16_hf), load_hf_tensors(back)
    assert sorted(original) == sorted(exported)
    for name, tensor in original.items():
        assert tensor.dtype == torch.bfloat16 and exported[name].dtype == torch.bfloat16
        assert torch.equal(tensor, exported[name]), name


@pytest.mark.parametrize("tp", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_bf16_rewards_agree_with_transformers_in_bf16(bf16_hf, bf16_mcore, tp):
    from transformers import AutoModelForSequenceClassification

    hf = AutoModelForSequenceClassification.from_pretrained(str(bf16_hf), dtype=torch.bfloat16)
    hf.eval()
    expected = []
    for left in (False, True):  # the batches tests.test_on_gpu._megarm_rewards scores
        tokens, valid = token_batch(left)
        with torch.no_grad():
            logits = hf(input_ids=tokens, attention_mask=valid.long()).logits[:, 0]
        expected.append(logits.float())
    results = run_distributed(_megarm_rewards, tp, str(bf16_mcore), tp, "bf16")
    got = [r for r in results if r[0] is not None][0][:-1]  # the last entry: the attention class
    for mine, theirs in zip(got, expected, strict=True):
        assert (mine - theirs).abs().max() <= BF16_RTOL * theirs.abs().max(), (mine, theirs)
        # Same ranking of the six rows, so pairwise decisions agree.
        assert torch.equal(mine.argsort(), theirs.argsort())
