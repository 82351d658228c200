"""Table lines the decoder families here share (Qwen2, Qwen3, Llama and their
mixture-of-experts siblings): the shape keys of config.json, the RoPE keys, the
expert keys, the trunk's weights (dense MLP or router, routed experts and shared
expert), the value head, and the refusals of what no megarm trunk represents
(sliding windows, DeepSeek-style latent attention, dense layers among sparse ones).
A family's module picks from these and adds its own lines."""

from __future__ import annotations

from megarm.families.base import ConfigKey, Refusal, WeightRule

L = "model.layers.{i}."
M = "decoder.layers.{i}."

# --------------------------------------------------------------------------- config

SHAPE_KEYS: tuple[ConfigKey, ...] = (
    ConfigKey("num_hidden_layers", "num_layers"),
    ConfigKey("hidden_size", "hidden_size"),
    ConfigKey("intermediate_size", "ffn_hidden_size"),
    ConfigKey("num_attention_heads", "num_attention_heads"),
    # HF: no num_key_value_heads means one KV head per query head.
    ConfigKey("num_key_value_heads", "num_query_groups", same_as="num_attention_heads"),
    # Absent: hidden_size / num_attention_heads, which megarm derives itself.
    ConfigKey("head_dim", "kv_channels", default=None),
    ConfigKey("vocab_size", "vocab_size"),
)


def numerics_keys(max_positions: int, eps: float) -> tuple[ConfigKey, ...]:
    """Positions, RoPE base and norm epsilon, with the family's HF defaults."""
    return (
        ConfigKey("max_position_embeddings", "max_position_embeddings", default=max_positions),
        # transformers 5 writes it under rope_parameters only.
        ConfigKey("rope_theta", "rotary_base", default=10000.0, also=("rope_parameters.rope_theta",)),
        ConfigKey("rms_norm_eps", "norm_epsilon", default=eps),
        ConfigKey("tie_word_embeddings", "tie_word_embeddings", default=False),
    )


def rope_type_key(values: dict[str, bool]) -> ConfigKey:
    """The RoPE variant: HF's ``rope_type`` (``type`` in older configs) ->
    ``use_rope_scaling``; a type outside ``values`` (yarn, dynamic, longrope, ...)
    is refused by name."""
    return ConfigKey(
        "rope_scaling.rope_type",
        "use_rope_scaling",
        default="default",
        also=("rope_scaling.type", "rope_parameters.rope_type", "rope_parameters.type"),
        values=values,
        what="RoPE type",
    )


# Llama 3.1's frequency scaling ("llama3"): read and written only with it.
LLAMA3_ROPE_KEYS: tuple[ConfigKey, ...] = tuple(
    ConfigKey(f"rope_scaling.{hf}", ours, also=(f"rope_parameters.{hf}",), when="use_rope_scaling")
    for hf, ours in (
        ("factor", "rope_scaling_factor"),
        ("low_freq_factor", "rope_low_freq_factor"),
        ("high_freq_factor", "rope_high_freq_factor"),
        ("original_max_position_embeddings", "rope_original_max_positions"),
    )
)



def moe_keys(experts: int, topk: int, ffn: int, shared: int | None = None) -> tuple[ConfigKey, ...]:
    """The expert keys of a mixture-of-experts config, with the family's HF defaults;
    ``shared``: the shared expert's FFN default (``None``: the family has none).

    HF routes with a softmax over the experts, then the top ``num_experts_per_tok``;
    ``norm_topk_prob`` renormalises those probabilities to sum to one (megatron-core's
    top-k of the logits, then a softmax over them), else they are kept as they are
    (megatron-core's softmax before the top-k).
    """
    keys = (
        # transformers 5 writes Qwen3-MoE's count as num_local_experts.
        ConfigKey("num_experts", "num_moe_experts", default=experts, also=("num_local_experts",)),
        ConfigKey("num_experts_per_tok", "moe_router_topk", default=topk),
        ConfigKey("moe_intermediate_size", "moe_ffn_hidden_size", default=ffn),
        ConfigKey("norm_topk_prob", "moe_norm_topk_prob", default=False),
        ConfigKey("router_aux_loss_coef", "moe_aux_loss_coeff", default=0.001),
    )
    if shared is None:
        return keys
    return (*keys, ConfigKey("shared_expert_intermediate_size", "moe_shared_expert_intermediate_size",
                             default=shared))


# --------------------------------------------------------------------------- refusals


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and value > 0


DENSE_ONLY: tuple[Refusal, ...] = tuple(
    Refusal(key, _positive, f"{key}={{value}}: a mixture-of-experts model in a dense family; "
            "megarm's mixture-of-experts families are qwen3_moe and qwen2_moe (their model_type)")
    for key in ("num_experts", "num_local_experts")
)

# What no megarm family represents: DeepSeek-style experts (n_routed_experts, with
# grouped routing and a sigmoid router) and multi-head latent attention (MLA).
UNSUPPORTED: tuple[Refusal, ...] = (
    Refusal("n_routed_experts", _positive,
            "n_routed_experts={value}: DeepSeek-style experts (grouped sigmoid routing); megarm's "
            "mixture-of-experts families are qwen3_moe and qwen2_moe"),
    Refusal("kv_lora_rank", _positive,
            "kv_lora_rank={value}: multi-head latent attention (MLA); megarm's attention is "
            "grouped-query attention"),
)


def _dense_layers(value: object) -> bool:
    return bool(value)


# Dense MLP layers among the sparse ones. megatron-core could place them
# (moe_layer_freq as a list), but megarm's weight table has one layer kind per family;
# every published Qwen3-MoE and Qwen2-MoE model has experts in every layer.
SPARSE_EVERY_LAYER: tuple[Refusal, ...] = (
    Refusal("decoder_sparse_step", lambda value: value != 1,
            "decoder_sparse_step={value}: dense MLP layers among the expert layers; megarm's "
            "mixture-of-experts trunks have experts in every layer (decoder_sparse_step 1)"),
    Refusal("mlp_only_layers", _dense_layers,
            "mlp_only_layers={value}: dense MLP layers among the expert layers; megarm's "
            "mixture-of-experts trunks have experts in every layer (mlp_only_layers [])"),
)

FULL_ATTENTION: tuple[Refusal, ...] = (
    Refusal(
        "use_sliding_window",
        bool,
        "use_sliding_window is true; megarm attends over the whole sequence. Set it false "
        "if the model was trained without a window",
    ),
    Refusal(
        "layer_types",
        lambda value: any(kind != "full_attention" for kind in value),
        "layer_types has sliding-window layers; megarm attends over the whole sequence",
    ),
)

# HF tensors a reward model deliberately leaves out: the LM head (small models tie it
# to the embedding and have none) and RoPE buffers some old checkpoints saved.
DROPPED = ("lm_head.weight",)
DROPPED_SUFFIXES = ("rotary_emb.inv_freq",)

# Keys that describe more than the shape; the export carries them over from the
# source config.json (hf2mcore copies it beside the weights).
CARRIED = ("bos_token_id", "eos_token_id", "initializer_range", "attention_dropout")
# And the mixture-of-experts ones (HF training switches).
MOE_CARRIED = ("output_router_logits",)

# --------------------------------------------------------------------------- weights

EMBEDDING = WeightRule(
    ("model.embed_tokens.weight",), (("V", "H"),),
    "embedding.word_embeddings.weight", "vocab-pad", "embedding", tp=0,
)
INPUT_NORM = WeightRule(
    (L + "input_layernorm.weight",), (("H",),),
    M + "input_layernorm.weight", "copy", "layer", tp=None,
    te=M + "self_attention.linear_qkv.layer_norm_weight",
)
QKV = WeightRule(
    tuple(L + f"self_attn.{p}_proj.weight" for p in "qkv"), (("Q", "H"), ("K", "H"), ("K", "H")),
    M + "self_attention.linear_qkv.weight", "qkv-group", "layer", tp=0,
)
QKV_BIAS = WeightRule(
    tuple(L + f"self_attn.{p}_proj.bias" for p in "qkv"), (("Q",), ("K",), ("K",)),
    M + "self_attention.linear_qkv.bias", "qkv-group", "layer", tp=0,
)
# Qwen3's QK-norm: one RMSNorm over the head dimension, shared by every head.
Q_NORM = WeightRule(
    (L + "self_attn.q_norm.weight",), (("D",),),
    M + "self_attention.q_layernorm.weight", "copy", "layer", tp=None,
)
K_NORM = WeightRule(
    (L + "self_attn.k_norm.weight",), (("D",),),
    M + "self_attention.k_layernorm.weight", "copy", "layer", tp=None,
)
OUT_PROJ = WeightRule(
    (L + "self_attn.o_proj.weight",), (("H", "Q"),),
    M + "self_attention.linear_proj.weight", "copy", "layer", tp=1,
)
MLP_NORM = WeightRule(
    (L + "post_attention_layernorm.weight",), (("H",),),
    M + "pre_mlp_layernorm.weight", "copy", "layer", tp=None,
    te=M + "mlp.linear_fc1.layer_norm_weight",
)
FC1 = WeightRule(
    (L + "mlp.gate_proj.weight", L + "mlp.up_proj.weight"), (("F", "H"), ("F", "H")),
    M + "mlp.linear_fc1.weight", "fc1-cat", "layer", tp="fc1",
)
FC2 = WeightRule(
    (L + "mlp.down_proj.weight",), (("H", "F"),),
    M + "mlp.linear_fc2.weight", "copy", "layer", tp=1,
)
FINAL_NORM = WeightRule(
    ("model.norm.weight",), (("H",),),
    "decoder.final_layernorm.weight", "copy", "final", tp=None,
)
# Mixture-of-experts layers: the router, each routed expert's SwiGLU MLP (SequentialMLP's
# local experts; megatron-core's checkpoint numbers them globally whatever the EP), and
# Qwen2-MoE's shared expert with its sigmoid gate. The norm before the MoE layer stays
# a module of its own in the TE spec as well.
MOE_MLP_NORM = WeightRule(
    (L + "post_attention_layernorm.weight",), (("H",),),
    M + "pre_mlp_layernorm.weight", "copy", "layer", tp=None,
)
ROUTER = WeightRule(
    (L + "mlp.gate.weight",), (("E", "H"),),
    M + "mlp.router.weight", "copy", "layer", tp=None,
)
EXPERT_FC1 = WeightRule(
    (L + "mlp.experts.{e}.gate_proj.weight", L + "mlp.experts.{e}.up_proj.weight"),
    (("M", "H"), ("M", "H")),
    M + "mlp.experts.local_experts.{e}.linear_fc1.weight", "fc1-cat", "layer", tp="fc1",
)
EXPERT_FC2 = WeightRule(
    (L + "mlp.experts.{e}.down_proj.weight",), (("H", "M"),),
    M + "mlp.experts.local_experts.{e}.linear_fc2.weight", "copy", "layer", tp=1,
)
SHARED_FC1 = WeightRule(
    (L + "mlp.shared_expert.gate_proj.weight", L + "mlp.shared_expert.up_proj.weight"),
    (("S", "H"), ("S", "H")),
    M + "mlp.shared_experts.linear_fc1.weight", "fc1-cat", "layer", tp="fc1",
)
SHARED_FC2 = WeightRule(
    (L + "mlp.shared_expert.down_proj.weight",), (("H", "S"),),
    M + "mlp.shared_experts.linear_fc2.weight", "copy", "layer", tp=1,
)
SHARED_GATE = WeightRule(
    (L + "mlp.shared_expert_gate.weight",), (("1", "H"),),
    M + "mlp.shared_experts.gate_weight", "copy", "layer", tp=None,
)
# *ForSequenceClassification's score head (num_labels rows: 1 for a reward model,
# one per attribute for a regression head) is megarm's value head.
VALUE_HEAD = WeightRule(
    ("score.weight",), (("N", "H"),),
    "value_head.weight", "copy", "final", tp=None, head="value",
)
# *ForCausalLM's LM head is megarm's vocab-parallel output layer (critique models,
# training.objective sft / joint); a reward model leaves it out (DROPPED), and a model
# with tied embeddings has no tensor of its own.
LM_HEAD = WeightRule(
    ("lm_head.weight",), (("V", "H"),),
    "output_layer.weight", "vocab-pad", "final", tp=0, head="lm",
)
