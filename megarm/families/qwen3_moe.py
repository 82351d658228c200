"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention (QK-norm, no bias,
explicit ``head_dim``) with a mixture-of-experts MLP in every layer: a router (softmax
over the experts, top ``num_experts_per_tok``, renormalised with ``norm_topk_prob``)
and ``num_experts`` SwiGLU experts of ``moe_intermediate_size``; no shared expert."""

from __future__ import annotations

from megarm.families import common as c
from megarm.families.base import Family

QWEN3_MOE = Family(
    name="qwen3_moe",
    model_type="qwen3_moe",
    causal_lm="Qwen3MoeForCausalLM",
    sequence_classification="Qwen3MoeForSequenceClassification",
    about="Qwen3 mixture-of-experts models (Qwen3-30B-A3B, Qwen3-235B-A22B)",
    config=(
        *c.SHAPE_KEYS,
        *c.numerics_keys(max_positions=32768, eps=1e-6),
        c.rope_type_key({"default": False}),
        *c.moe_keys(experts=128, topk=8, ffn=768),
    ),
    fixed={"add_qkv_bias": False, "qk_layernorm": True},
    hf_fixed={"hidden_act": "silu", "attention_bias": False},
    refusals=(*c.UNSUPPORTED, *c.SPARSE_EVERY_LAYER, *c.FULL_ATTENTION),
    weights=(
        c.EMBEDDING, c.INPUT_NORM, c.QKV, c.Q_NORM, c.K_NORM, c.OUT_PROJ, c.MOE_MLP_NORM,
        c.ROUTER, c.EXPERT_FC1, c.EXPERT_FC2, c.FINAL_NORM, c.VALUE_HEAD, c.LM_HEAD,
    ),
    dropped=c.DROPPED,
    dropped_suffixes=c.DROPPED_SUFFIXES,
    carried=(*c.CARRIED, *c.MOE_CARRIED, "sliding_window", "use_sliding_window"),
    windowed=True,
)
