"""Llama 3 / 3.1 / 3.2 / 3.3: no biases, RMSNorm epsilon 1e-5, Llama 3.1's RoPE
frequency scaling (``rope_type: llama3``: factor, low/high frequency factors, the
original context length), tied embeddings in the 1B and 3B."""

from __future__ import annotations

from megarm.families import common as c
from megarm.families.base import Family

LLAMA = Family(
    name="llama",
    model_type="llama",
    causal_lm="LlamaForCausalLM",
    sequence_classification="LlamaForSequenceClassification",
    about="Llama 3, 3.1, 3.2 and 3.3 (1B-70B; Llama 2 shapes too)",
    config=(
        *c.SHAPE_KEYS,
        *c.numerics_keys(max_positions=2048, eps=1e-6),
        c.rope_type_key({"default": False, "llama3": True}),
        *c.LLAMA3_ROPE_KEYS,
    ),
    fixed={"add_qkv_bias": False, "qk_layernorm": False},
    # attention_bias: biases on q/k/v and o_proj; mlp_bias: on the MLP. Llama 3 has none.
    hf_fixed={"hidden_act": "silu", "attention_bias": False, "mlp_bias": False},
    refusals=(*c.DENSE_ONLY, *c.UNSUPPORTED),
    weights=(
        c.EMBEDDING, c.INPUT_NORM, c.QKV, c.OUT_PROJ, c.MLP_NORM, c.FC1, c.FC2, c.FINAL_NORM,
        c.VALUE_HEAD, c.LM_HEAD,
    ),
    dropped=c.DROPPED,
    dropped_suffixes=c.DROPPED_SUFFIXES,
    carried=c.CARRIED,
)
