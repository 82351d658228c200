"""Sequence packing: layout, mask, positions, and packed == unpacked training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megarm.data.packing import (
    block_causal_mask,
    collate_packed,
    collate_thd,
    cu_seqlens,
    pack_lengths,
    packed_position_ids,
    row_width,
    segment_ids,
)
from megarm.testing import run_distributed
from tests.helpers import assert_rewards_close, padding_fraction, randomize_, tiny_config
from tests.test_training import _train


def _pair(chosen: list[int], rejected: list[int], margin: float = 0.0) -> dict:
    c, r = np.asarray(chosen, np.int32), np.asarray(rejected, np.int32)
    return {
        "chosen_input_ids": c,
        "chosen_labels": c.copy(),
        "rejected_input_ids": r,
        "rejected_labels": r.copy(),
        "margin": margin,
    }


# --------------------------------------------------------------------------- unit


def test_first_fit_decreasing_layout():
    # Longest first: 8 -> row0, 7 -> row1, 5 -> row2, 3 -> row1, 2 -> row0, 1 -> row2.
    lengths = [5, 3, 8, 2, 7, 1]
    rows = pack_lengths(lengths, 10)
    assert rows == [[2, 3], [4, 1], [0, 5]]
    assert row_width(rows, lengths) == 10
    assert row_width(rows, lengths, pad_to_multiple_of=4) == 12
    # Ties keep index order; everything fits one row when it can.
    assert pack_lengths([2, 2, 2], 6) == [[0, 1, 2]]
    assert pack_lengths([4, 4, 4], 6) == [[0], [1], [2]]
    with pytest.raises(ValueError, match="exceeds seq_length"):
        pack_lengths([3, 7], 6)


def test_block_causal_mask_matches_hand_written():
    lengths = [2, 1]
    rows = pack_lengths(lengths, 4)
    width = row_width(rows, lengths, pad_to_multiple_of=4)
    seg = segment_ids(rows, lengths, width)
    assert seg.tolist() == [[0, 0, 1, -4]]
    T, F = True, False
    expected = torch.tensor(
        [
            [F, T, T, T],  # token 0 of sequence 0
            [F, F, T, T],  # token 1 of sequence 0
            [T, T, F, T],  # sequence 1: itself only
            [T, T, T, F],  # padding: itself only
        ]
    )
    mask = block_causal_mask(seg)
    assert mask.shape == (1, 1, 4, 4) and mask.dtype == torch.bool
    assert torch.equal(mask[0, 0], expected)
    # No query row is fully blocked (SDPA would give NaN).
    assert not mask.all(dim=-1).any()


def test_positions_restart_and_collate_layout():
    pairs = [_pair([11, 12, 13], [21]), _pair([31, 32], [41, 42, 43, 44])]
    # Sequences: 0=c0 (3), 1=c1 (2), 2=r0 (1), 3=r1 (4); capacity 6:
    # 4 -> row0, 3 -> row1, 2 -> row0, 1 -> row1.
    out = collate_packed(pairs, pad_token_id=0, seq_length=6)
    assert out["tokens"].tolist() == [
        [41, 42, 43, 44, 31, 32],
        [11, 12, 13, 21, 0, 0],
    ]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 0, 1]]
    assert out["reward_row"].tolist() == [1, 0, 1, 0]
    assert out["reward_index"].tolist() == [2, 5, 3, 3]
    assert out["lengths"].tolist() == [3, 2, 1, 4]
    assert out["labels"][1].tolist() == [11, 12, 13, 21, -100, -100]
    assert out["attention_mask"].shape == (2, 1, 6, 6)
    picked = out["tokens"][out["reward_row"], out["reward_index"]]
    assert picked.tolist() == [13, 32, 21, 44]  # each sequence's last token
    assert packed_position_ids([[0]], [2], 4).tolist() == [[0, 1, 0, 1]]


def test_padding_fraction():
    lengths = [5, 3, 8, 2, 7, 1]  # 26 tokens
    # Unpacked: 6 rows x 8; packed: 3 rows x 10.
    assert padding_fraction(lengths, 6, 8) == pytest.approx(22 / 48)
    rows = pack_lengths(lengths, 10)
    assert padding_fraction(lengths, len(rows), row_width(rows, lengths)) == pytest.approx(4 / 30)


def test_thd_stream_layout_and_sdpa_segments():
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from megarm.model.attention import SDPAttention
    from megarm.model.builder import transformer_config

    samples = [_pair([1, 2, 3], [4, 5]), _pair([6], [7, 8, 9, 10], margin=0.5)]
    out = collate_thd(samples, pad_token_id=0, pad_to_multiple_of=4)
    # chosen 0, chosen 1, rejected 0, rejected 1 end to end: 3+1+2+4 = 10 -> 12.
    assert out["tokens"].tolist() == [[1, 2, 3, 6, 4, 5, 7, 8, 9, 10, 0, 0]]
    assert out["labels"].tolist() == [[1, 2, 3, 6, 4, 5, 7, 8, 9, 10, -100, -100]]
    assert out["cu_seqlens"].dtype == torch.int32
    assert out["cu_seqlens"].tolist() == [0, 3, 4, 6, 10, 12]  # the pad tail is a segment
    assert out["max_seqlen"] == 4
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1, 0, 1, 2, 3, 0, 1]]
    assert out["reward_index"].tolist() == [2, 3, 5, 9]
    assert out["reward_row"].tolist() == [0, 0, 0, 0]
    assert out["margin"].tolist() == [0.0, 0.5]
    assert cu_seqlens([3, 1], 4).tolist() == [0, 3, 4]  # no tail when it fits exactly
    # SDPA over cu_seqlens segments == SDPA with the rows layout's block-causal mask
    # on the same stream (GQA: 4 query heads, 2 KV heads).
    attention = SDPAttention(transformer_config(tiny_config()), 1, AttnMaskType.causal, "self")
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(12, 4, 16, generator=gen)
    k, v = (torch.randn(12, 2, 16, generator=gen) for _ in range(2))
    cu = out["cu_seqlens"]
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=4, max_seqlen_kv=4)
    thd = attention(q, k, v, None, packed_seq_params=params)
    segments = np.repeat(np.arange(5), np.diff(cu.numpy()))[None]
    dense = attention(q[:, None], k[:, None], v[:, None], block_causal_mask(segments))
    assert thd.shape == (12, 64)
    torch.testing.assert_close(thd, dense[:, 0], rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- model


def _forward_equal():
    """Rewards and loss of one micro-batch, padded vs packed, on the same weights."""
    from megarm import distributed
    from megarm.data.dataset import collate_pairs
    from megarm.data.synthetic import SyntheticPairs
    from megarm.model.builder import build_model
    from megarm.model.step import forward_step
    from megarm.training.data import to_pair_batch
    from megarm.training.loss import loss_func

    cfg = tiny_config()
    distributed.init(seed=cfg.training.seed)
    (model,) = build_model(cfg)
    model.load_state_dict(randomize_(model.state_dict()))
    data = SyntheticPairs(8, 250, 16, seed=3)  # lengths <= 16: rows of 32 pack
    samples = [data[i] for i in range(4)]
    results = []
    layouts = (
        collate_pairs(samples, 0),
        collate_packed(samples, 0, 32),
        collate_thd(samples, 0, pad_to_multiple_of=8),
    )
    for collated in layouts:
        batch = to_pair_batch(collated)
        with torch.no_grad():
            rewards, loss_fn = forward_step(iter([batch]), model, loss_func)
            loss, extra = loss_fn(rewards)
        results.append((rewards, loss, extra["stats"], batch.tokens.shape[0]))
    # Per-token RoPE of plain positions equals the fast path (broadcast over rows).
    pos = torch.arange(32).expand(3, 32)
    fast = model.rotary_pos_emb(32)
    per_token = model.rotary_pos_emb(32)[:, 0][pos.t()]
    assert per_token.shape == (32, 3, 1, fast.shape[-1])
    assert torch.equal(per_token, fast.expand(32, 3, 1, -1))
    return results


@pytest.mark.slow
def test_packed_forward_equals_padded():
    ((padded, *packed_layouts),) = run_distributed(_forward_equal, 1)
    for packed in packed_layouts:  # rows with a dense mask, then one THD stream
        assert packed[3] < padded[3]  # fewer rows
        assert_rewards_close(packed[0], padded[0])
        assert abs(float(packed[1]) - float(padded[1])) < 1e-5
        # Metrics count the same real tokens (tokens and tokens_sq are the last two).
        torch.testing.assert_close(packed[2][-2:], padded[2][-2:])


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def reference():
    ((history, full, _),) = run_distributed(_train, 1, (), None)
    return history, full


_TP2 = ("parallel.tensor_model_parallel_size=2",)
_PP2 = ("parallel.pipeline_model_parallel_size=2",)
_FULL = ("model.recompute_granularity=full",)
_SP = ("parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true")
_slow = pytest.mark.slow
# The quick subset keeps one layout per packing format and TP=2 for THD (the default).
PACKED = [
    pytest.param(1, (), "rows", id="tp1-pp1-rows"),
    pytest.param(1, (), "thd", id="tp1-pp1-thd"),
    pytest.param(1, _FULL, "rows", id="full-recompute-rows", marks=_slow),
    pytest.param(1, _FULL, "thd", id="full-recompute-thd", marks=_slow),
    pytest.param(2, _TP2, "rows", id="tp2-rows", marks=_slow),
    pytest.param(2, _TP2, "thd", id="tp2-thd"),
    pytest.param(2, _PP2, "rows", id="pp2-rows", marks=_slow),
    pytest.param(2, _PP2, "thd", id="pp2-thd", marks=_slow),
    pytest.param(2, _SP, "rows", id="tp2-sp-rows", marks=_slow),
    pytest.param(2, _SP, "thd", id="tp2-sp-thd", marks=_slow),
]


@pytest.mark.parametrize("world, overrides, layout", PACKED)
def test_packed_training_equals_padded(reference, world, overrides, layout):
    expected, full = reference
    packing = ("data.packing=true", f"data.packed_format={layout}")
    results = run_distributed(_train, world, (*packing, *overrides), full)
    for history, _, _ in results:
        first, ref = history[0], expected[0]
        assert math.isclose(first["loss"], ref["loss"], rel_tol=1e-6)
        assert math.isclose(first["grad_norm"], ref["grad_norm"], rel_tol=1e-6)
        for got, want in zip(history, expected, strict=True):
            assert abs(got["loss"] - want["loss"]) < 1e-5


def test_auto_layout_is_thd_wherever_attention_reads_cu_seqlens(monkeypatch):
    from megarm import platform
    from megarm.model import builder

    for te, backend, expected in [
        (True, "auto", "thd"),
        (False, "auto", "thd"),
        (False, "sdpa", "thd"),
        (False, "unfused", "rows"),
    ]:
        monkeypatch.setattr(platform, "has_transformer_engine", lambda te=te: te)
        cfg = tiny_config("data.packing=true", f"model.attention_backend={backend}")
        assert builder.packed_format(cfg) == expected
    cfg = tiny_config("data.packing=true", "data.packed_format=rows")
    assert builder.packed_format(cfg) == "rows"
    assert builder.packed_format(tiny_config()) is None
