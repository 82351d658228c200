"""Shared helpers for tests: tiny configs, known weights, batches, rank bodies."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

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


# Test-only helpers (no production code uses them).


def last_valid_index(valid: Tensor) -> Tensor:
    """``[b]`` position of each row's rightmost real token (the reward token), as
    transformers' ``Qwen2ForSequenceClassification`` picks it. Rows without any real
    token are an error rather than a silent index."""
    valid = valid.bool()
    if not bool(valid.any(dim=1).all()):
        raise ValueError("a row has no real token; every row needs at least one")
    positions = torch.arange(valid.shape[1], device=valid.device)
    return (positions * valid).argmax(dim=1)


def padding_fraction(lengths: Sequence[int], rows: int, width: int) -> float:
    """Share of a ``rows x width`` batch that is padding."""
    total = rows * width
    return (total - int(sum(lengths))) / total if total else 0.0


def build_data_loader(
    dataset: Any,
    micro_batch_size: int,
    pad_token_id: int,
    data_parallel_rank: int = 0,
    data_parallel_size: int = 1,
    consumed_samples: int = 0,
    shuffle: bool = True,
    seed: int = 1234,
    seq_length: int | None = None,
    pad_to_multiple_of: int = 1,
    num_samples: int | None = None,
    num_workers: int = 0,
) -> Any:
    """A ``torch.utils.data.DataLoader`` over :class:`PairBatchSampler` and
    :func:`collate_pairs` for one data-parallel rank."""
    from functools import partial

    from megarm.data.dataset import PairBatchSampler, collate_pairs

    sampler = PairBatchSampler(
        len(dataset),
        micro_batch_size,
        data_parallel_rank,
        data_parallel_size,
        consumed_samples,
        shuffle,
        seed,
        num_samples,
    )
    collate = partial(
        collate_pairs,
        pad_token_id=pad_token_id,
        seq_length=seq_length,
        pad_to_multiple_of=pad_to_multiple_of,
    )
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers
    )


def from_dict(data: dict) -> MegarmConfig:
    """Inverse of :func:`to_dict` (with the same checks as YAML loading)."""
    overrides = [
        f"{section}.{key}={json.dumps(value)}"
        for section, body in data.items()
        for key, value in (body or {}).items()
    ]
    return load_config(None, overrides)


def load_full_state(trainer, full: dict[str, torch.Tensor]) -> None:  # noqa: ANN001 - a Trainer
    """Load a full (TP=1, PP=1) state dict into a Trainer's shards on this rank and
    refresh the optimizer's main parameters."""
    from megarm.model.sharding import load_full_state_dict

    load_full_state_dict(trainer.model, full, trainer.cfg)
    trainer.optimizer.reload_model_params()


# Text records a tiny model learns from content alone (issue #28's recipes).
GOOD_WORDS = ("great", "clear", "correct", "helpful", "precise", "kind")
BAD_WORDS = ("wrong", "rude", "vague", "broken", "messy", "late")


def _quality_text(rng: Any, quality: float, words: int) -> str:
    return " ".join(rng.choice(GOOD_WORDS) if rng.random() < quality else rng.choice(BAD_WORDS)
                    for _ in range(words))


def ranked_text_record(rng: Any, k: int = 4) -> dict[str, Any]:
    """``{prompt, responses, scores}``: response ``j`` is good-word share ``1 - j/(k-1)``,
    scored ``k - 1 - j`` (order shuffled)."""
    order = list(range(k))
    rng.shuffle(order)
    responses, scores = [], []
    for j in order:
        text = _quality_text(rng, 1.0 - j / (k - 1), 6)
        while text in responses:
            text = _quality_text(rng, 1.0 - j / (k - 1), 6)
        responses.append(text)
        scores.append(float(k - 1 - j))
    return {"prompt": f"Review number {rng.randint(0, 999)}.", "responses": responses,
            "scores": scores}


def helpsteer_text_record(rng: Any, missing: bool = False) -> dict[str, Any]:
    """A HelpSteer2-style row: the good-word share ``q`` sets helpfulness,
    correctness and complexity ``4q``, coherence ``4(1-q)``, verbosity from the
    length; ``missing`` drops correctness (null)."""
    words = rng.randint(2, 8)
    text = _quality_text(rng, rng.random(), words)
    q = sum(w in GOOD_WORDS for w in text.split()) / words
    return {
        "prompt": f"Review number {rng.randint(0, 999)}.",
        "response": text,
        "helpfulness": 4 * q, "correctness": None if missing else 4 * q,
        "coherence": 4 * (1 - q), "complexity": 4 * q, "verbosity": 4 * (words - 2) / 6,
    }
# Llama 3.0 Instruct's chat template, as published.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
LLAMA3_VOCAB = 128256
# Llama 3.1's special tokens (ids 128000-128255): the named ones, the rest reserved.
LLAMA3_NAMED = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>",
                128004: "<|finetune_right_pad_id|>", 128006: "<|start_header_id|>",
                128007: "<|end_header_id|>", 128008: "<|eom_id|>", 128009: "<|eot_id|>",
                128010: "<|python_tag|>"}
LLAMA3_EOT, LLAMA3_PAD = 128009, 128004


def build_llama3_tokenizer(out: Any, pad_token: str | None = "<|eot_id|>") -> Any:
    """A Llama-3-shaped fast tokenizer, offline: byte-level (one token per byte; the
    rest of the first 128000 ids never produced), Llama 3.1's 256 special tokens at
    their ids, bos ``<|begin_of_text|>``, eos ``<|eot_id|>`` (Instruct's), the published
    chat template, and ``pad_token`` (Llama 3 has none; many setups pad with eos)."""
    from pathlib import Path

    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    from megarm.data.tokenizer import _byte_to_unicode

    chars = list(_byte_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({f"<filler_{i}>": i for i in range(len(chars), 128000)})
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=[], fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    # Reserved tokens numbered over the unnamed ids, as Llama 3.1 numbers them.
    unnamed = iter(range(LLAMA3_VOCAB))
    specials = [LLAMA3_NAMED.get(i) or f"<|reserved_special_token_{next(unnamed)}|>"
                for i in range(128000, LLAMA3_VOCAB)]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    assert tokenizer.token_to_id("<|eot_id|>") == LLAMA3_EOT
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>", "chat_template": LLAMA3_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": True, "model_max_length": 131072,
    }
    if pad_token is not None:
        config["pad_token"] = pad_token
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out


# fp32 rewards of two computation paths (layouts, kernels, HF vs megarm) differ by
# summation order: ~1e-7 of their magnitude per op, 1.3e-6 relative measured at a
# reward of -8.56 (issue 25). So the tolerance is relative to the largest |reward|,
# and never below 1e-5 absolute (the tiny test models' rewards are O(1)).
FP32_REWARD_REL = 1e-5


def rewards_tolerance(want: Any, rel: float = FP32_REWARD_REL) -> float:
    """The absolute tolerance for comparing fp32 rewards with ``want``: ``rel`` of the
    largest |reward|, at least ``rel``."""
    values = torch.as_tensor(want, dtype=torch.float64)
    return rel * max(1.0, float(values.abs().max())) if values.numel() else rel


def assert_rewards_close(got: Any, want: Any, rel: float = FP32_REWARD_REL) -> None:
    """``got`` equals ``want`` (tensors or lists of fp32 rewards) within
    :func:`rewards_tolerance`."""
    torch.testing.assert_close(torch.as_tensor(got, dtype=torch.float64),
                               torch.as_tensor(want, dtype=torch.float64),
                               rtol=0, atol=rewards_tolerance(want, rel))
