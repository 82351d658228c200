"""Qwen2 / Qwen2.5: QKV bias, no QK-norm, plain RoPE (the published configs carry a
sliding window that is off)."""

from __future__ import annotations

from megarm.families import common as c
from megarm.families.base import Family

QWEN2 = Family(
    name="qwen2",
    model_type="qwen2",
    causal_lm="Qwen2ForCausalLM",
    sequence_classification="Qwen2ForSequenceClassification",
    about="Qwen2 and Qwen2.5 dense models (0.5B-72B)",
    config=(
        *c.SHAPE_KEYS,
        *c.numerics_keys(max_positions=32768, eps=1e-6),
        c.rope_type_key({"default": False}),
    ),
    # HF's Qwen2 attention always has q/k/v biases (and no other).
    fixed={"add_qkv_bias": True, "qk_layernorm": False},
    hf_fixed={"hidden_act": "silu"},
    refusals=(*c.DENSE_ONLY, *c.UNSUPPORTED, *c.FULL_ATTENTION),
    weights=(
        c.EMBEDDING, c.INPUT_NORM, c.QKV, c.QKV_BIAS, c.OUT_PROJ, c.MLP_NORM, c.FC1, c.FC2,
        c.FINAL_NORM, c.VALUE_HEAD, c.LM_HEAD,
    ),
    dropped=c.DROPPED,
    dropped_suffixes=c.DROPPED_SUFFIXES,
    carried=(*c.CARRIED, "sliding_window", "max_window_layers", "use_sliding_window"),
    windowed=True,
)
