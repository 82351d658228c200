"""Qwen3 dense: QK-norm (an RMSNorm over the head dimension on every query and key
head, before RoPE), no QKV bias, an explicit ``head_dim`` (128 at every size,
which is not hidden / heads for 0.6B-4B), plain RoPE."""

from __future__ import annotations

from megarm.families import common as c
from megarm.families.base import Family

QWEN3 = Family(
    name="qwen3",
    model_type="qwen3",
    causal_lm="Qwen3ForCausalLM",
    sequence_classification="Qwen3ForSequenceClassification",
    about="Qwen3 dense models (0.6B-32B); not the MoE ones (qwen3_moe)",
    config=(
        *c.SHAPE_KEYS,
        *c.numerics_keys(max_positions=32768, eps=1e-6),
        c.rope_type_key({"default": False}),
    ),
    fixed={"add_qkv_bias": False, "qk_layernorm": True},
    # attention_bias would add biases to q/k/v *and* o_proj; no Qwen3 model has them.
    hf_fixed={"hidden_act": "silu", "attention_bias": False},
    refusals=(*c.DENSE_ONLY, *c.UNSUPPORTED, *c.FULL_ATTENTION),
    weights=(
        c.EMBEDDING, c.INPUT_NORM, c.QKV, c.Q_NORM, c.K_NORM, c.OUT_PROJ, c.MLP_NORM, c.FC1,
        c.FC2, c.FINAL_NORM, c.VALUE_HEAD, c.LM_HEAD,
    ),
    dropped=c.DROPPED,
    dropped_suffixes=c.DROPPED_SUFFIXES,
    carried=(*c.CARRIED, "sliding_window", "max_window_layers", "use_sliding_window"),
    windowed=True,
)
