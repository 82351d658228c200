"""Shared helpers for tests: tiny configs, known weights, batches, rank bodies."""

from __future__ import annotations

import torch

from megarm.config import MegarmConfig, load_config

PAD = 0


def tiny_config(*overrides: str) -> MegarmConfig:
    """A 4-layer Qwen2-shaped model (GQA 4 heads / 2 groups, QKV bias), fp32."""
    base = [
        "model.num_layers=4",
        "model.hidden_size=64",
        "model.ffn_hidden_size=128",
        "model.num_attention_heads=4",
        "model.num_query_groups=2",
        "model.vocab_size=250",
        "model.make_vocab_size_divisible_by=128",
        "model.max_position_embeddings=128",
        "model.params_dtype=fp32",
        "data.seq_length=32",
    ]
    return load_config(None, base + list(overrides))


def randomize_(state: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Fill every tensor (norms and biases included) with distinct random values,
    so a misplaced weight changes the output."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(state):
        t = state[name]
        if name.endswith("_extra_state") or not torch.is_floating_point(t):
            continue
        noise = torch.randn(t.shape, generator=gen, dtype=torch.float32)
        if "layernorm" in name or "layer_norm" in name:
            out[name] = 1.0 + 0.2 * noise
        else:
            out[name] = 0.08 * noise
    return out


def pair_batch(num_pairs: int, seq: int, vocab: int, seed: int = 0, left_pad: bool = False):
    """A PairBatch of random tokens with ragged lengths (right padding by default)."""
    from megarm.model.step import PairBatch

    gen = torch.Generator().manual_seed(seed)
    rows = 2 * num_pairs
    lengths = torch.randint(seq // 3, seq + 1, (rows,), generator=gen)
    tokens = torch.full((rows, seq), PAD, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        ids = torch.randint(1, vocab, (n,), generator=gen)
        if left_pad:
            tokens[i, seq - n :] = ids
        else:
            tokens[i, :n] = ids
    reward_index = (lengths - 1) if not left_pad else torch.full((rows,), seq - 1)
    margin = torch.rand(num_pairs, generator=gen)
    return PairBatch(
        tokens=tokens,
        position_ids=torch.arange(seq).expand(rows, seq).contiguous(),
        reward_index=reward_index,
        margin=margin,
    )
