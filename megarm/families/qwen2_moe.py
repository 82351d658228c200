"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): Qwen2's attention (QKV bias, no
QK-norm) with a mixture-of-experts MLP in every layer: a router (softmax over the
experts, top ``num_experts_per_tok``, renormalised only with ``norm_topk_prob``),
``num_experts`` SwiGLU experts of ``moe_intermediate_size``, and one shared expert of
``shared_expert_intermediate_size`` scaled by a sigmoid gate
(``sigmoid(shared_expert_gate(x))``, megatron-core's ``moe_shared_expert_gate``)."""

from __future__ import annotations

from megarm.families import common as c
from megarm.families.base import Family

QWEN2_MOE = Family(
    name="qwen2_moe",
    model_type="qwen2_moe",
    causal_lm="Qwen2MoeForCausalLM",
    sequence_classification="Qwen2MoeForSequenceClassification",
    about="Qwen1.5-MoE and Qwen2 mixture-of-experts models (A2.7B, 57B-A14B)",
    config=(
        *c.SHAPE_KEYS,
        *c.numerics_keys(max_positions=32768, eps=1e-6),
        c.rope_type_key({"default": False}),
        *c.moe_keys(experts=60, topk=4, ffn=1408, shared=5632),
    ),
    fixed={"add_qkv_bias": True, "qk_layernorm": False},
    # transformers 5 names the q/k/v biases' switch; megarm's qwen2_moe has them.
    hf_fixed={"hidden_act": "silu", "qkv_bias": True},
    refusals=(*c.UNSUPPORTED, *c.SPARSE_EVERY_LAYER, *c.FULL_ATTENTION),
    weights=(
        c.EMBEDDING, c.INPUT_NORM, c.QKV, c.QKV_BIAS, c.OUT_PROJ, c.MOE_MLP_NORM, c.ROUTER,
        c.EXPERT_FC1, c.EXPERT_FC2, c.SHARED_FC1, c.SHARED_FC2, c.SHARED_GATE, c.FINAL_NORM,
        c.VALUE_HEAD, c.LM_HEAD,
    ),
    dropped=c.DROPPED,
    dropped_suffixes=c.DROPPED_SUFFIXES,
    carried=(*c.CARRIED, *c.MOE_CARRIED, "sliding_window", "max_window_layers",
             "use_sliding_window"),
    windowed=True,
)
