"""Turn a :class:`megarm.config.MegarmConfig` into reward-model chunks on this rank.

Which heads the last stage gets follows ``training.objective``
(:func:`heads`): the value head for ``rm`` and ``joint``, the vocabulary output
layer for ``sft`` and ``joint`` only."""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from megarm import platform
from megarm.config import MegarmConfig, packed_format
from megarm.families.base import head_dim, padded_vocab_size
from megarm.model.attention import SDPAttention
from megarm.model.norm import RMSNorm
from megarm.model.reward_model import RewardModel


def params_dtype(cfg: MegarmConfig) -> torch.dtype:
    """The parameter dtype: ``auto`` is bf16 on CUDA and fp32 on CPU."""
    return platform.dtype(cfg.model.params_dtype)


def moe_settings(cfg: MegarmConfig) -> dict[str, Any]:
    """megatron-core's mixture-of-experts settings for the trunk (none when dense):
    every layer a ``MoELayer`` with ``num_moe_experts`` experts, top-k routing as the
    HF family does it (``moe_norm_topk_prob``: top-k of the logits, then a softmax;
    else a softmax, then the top-k), the router in fp32, dropless (no capacity
    factor), megatron-core's load-balancing auxiliary loss with ``moe_aux_loss_coeff``
    (and its router z-loss with ``moe_z_loss_coeff``),
    the alltoall dispatcher, and the shared expert's sigmoid gate when there is one."""
    m, p = cfg.model, cfg.parallel
    if not m.num_moe_experts:
        return {}
    shared = m.moe_shared_expert_intermediate_size
    return dict(
        num_moe_experts=m.num_moe_experts,
        moe_ffn_hidden_size=m.moe_ffn_hidden_size,
        moe_router_topk=m.moe_router_topk,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not m.moe_norm_topk_prob,
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=m.moe_aux_loss_coeff,
        moe_z_loss_coeff=m.moe_z_loss_coeff,
        moe_expert_capacity_factor=None,
        moe_shared_expert_intermediate_size=shared,
        moe_shared_expert_gate=bool(shared),
        moe_grouped_gemm=platform.moe_grouped_gemm(),
        moe_permute_fusion=False,
        expert_model_parallel_size=p.expert_model_parallel_size,
    )


def transformer_config(cfg: MegarmConfig) -> TransformerConfig:
    """megatron-core's TransformerConfig for the trunk ``cfg.model`` describes."""
    m, p = cfg.model, cfg.parallel
    dtype = params_dtype(cfg)
    return TransformerConfig(
        **moe_settings(cfg),
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=head_dim(m),
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=m.add_qkv_bias,
        # Sums the QK-norm weights' gradients over TP ranks (each holds other heads).
        qk_layernorm=m.qk_layernorm,
        # megatron-core defaults both to 0.1; a reward model wants them off.
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        init_method_std=m.init_method_std,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        sequence_parallel=p.sequence_parallel,
        context_parallel_size=p.context_parallel_size,
        # transformer-engine's attention reads it; megarm's SDPA all-gathers K/V.
        cp_comm_type=p.cp_comm_type if p.context_parallel_size > 1 else None,
        use_cpu_initialization=not platform.is_cuda(),
        bias_activation_fusion=platform.is_cuda(),
        # transformer-engine's fused RoPE (bshd and THD) needs no host sync per layer;
        # it takes [s, 1, 1, d] frequencies, which packed rows (per-token positions,
        # local spec) do not have.
        apply_rope_fusion=platform.has_transformer_engine() and packed_format(cfg) != "rows",
        # The fused softmax of megatron-core's unfused attention is apex's CUDA
        # extension: TE alone does not make it importable.
        masked_softmax_fusion=platform.has_fused_softmax(),
        recompute_granularity=m.recompute_granularity,
        recompute_method=m.recompute_method if m.recompute_granularity == "full" else None,
        recompute_num_layers=(
            m.recompute_num_layers if m.recompute_granularity == "full" else None
        ),
        # Pipeline p2p sends are [s, b, h]; seq length varies per batch.
        variable_seq_lengths=True,
        # Required by variable_seq_lengths; the dispatcher of MoE layers.
        moe_token_dispatcher_type="alltoall",
    )


def rotary_scaling(cfg: MegarmConfig) -> tuple[float, float, float, int] | None:
    """Llama 3.1's RoPE frequency scaling, ``(factor, low frequency factor, high
    frequency factor, original context length)`` in the order megatron-core's
    RotaryEmbedding takes them (``model.use_rope_scaling``); ``None``: plain RoPE."""
    m = cfg.model
    if not m.use_rope_scaling:
        return None
    return (
        m.rope_scaling_factor,
        m.rope_low_freq_factor,
        m.rope_high_freq_factor,
        m.rope_original_max_positions,
    )


def _te_attention(cfg: MegarmConfig) -> bool:
    return cfg.model.attention_backend == "auto" and platform.has_transformer_engine()


def layer_spec(cfg: MegarmConfig) -> ModuleSpec:
    """The transformer layer spec: TE when importable on CUDA, local otherwise.

    The local spec uses megarm's RMSNorm (sequence-parallel capable) and, unless
    ``model.attention_backend`` asks for megatron-core's unfused attention,
    megarm's SDPA core attention. Packed ``rows`` need megarm's dense block mask,
    which TE's causal attention would ignore, so they take the local spec; packed
    ``thd`` runs on TE (cu_seqlens) as well as on SDPA.
    """
    qk_norm = cfg.model.qk_layernorm
    experts = cfg.model.num_moe_experts or None
    grouped = bool(experts) and platform.moe_grouped_gemm()
    if _te_attention(cfg) and packed_format(cfg) != "rows":
        # (experts, grouped GEMM): megatron-core's first two arguments
        return get_gpt_layer_with_transformer_engine_spec(experts, grouped, qk_layernorm=qk_norm)
    spec = copy.deepcopy(
        get_gpt_layer_local_spec(experts, grouped, normalization="RMSNorm", qk_layernorm=qk_norm)
    )
    spec.submodules.input_layernorm = RMSNorm
    spec.submodules.pre_mlp_layernorm = RMSNorm
    if qk_norm:  # over the head dimension, computed as HF's Qwen3RMSNorm
        spec.submodules.self_attention.submodules.q_layernorm = RMSNorm
        spec.submodules.self_attention.submodules.k_layernorm = RMSNorm
    if cfg.model.attention_backend in ("auto", "sdpa"):
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


def block_spec(
    cfg: MegarmConfig, config: TransformerConfig, vp_stage: int | None
) -> ModuleSpec | TransformerBlockSubmodules:
    """This chunk's block spec: the layer spec, plus megarm's final norm on the
    local path (megatron-core would otherwise pick WrappedTorchNorm)."""
    spec = layer_spec(cfg)
    if spec.submodules.input_layernorm is not RMSNorm:
        return spec
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[spec] * num_layers, layer_norm=RMSNorm)


def heads(cfg: MegarmConfig) -> tuple[bool, bool]:
    """``(value head, output layer)`` the objective needs."""
    objective = cfg.training.objective
    return objective in ("rm", "joint", "listwise", "regression", "prm"), objective in ("sft", "joint")


def build_model(cfg: MegarmConfig, device: str | None = None) -> list[RewardModel]:
    """This rank's model chunks (one, or ``virtual_pipeline_model_parallel_size``).

    ``device="meta"`` builds them without allocating weights (the converters use
    that for the sharded state dict's keys and shapes); the default is the
    platform's device. An output layer tied to the embedding on another pipeline
    stage starts as a copy of it (megatron-core's setup; not on the meta device).
    """
    value_head, output_layer = heads(cfg)
    config = transformer_config(cfg)
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size
    target = torch.device(device) if device is not None else platform.device()
    on_meta = torch.device("meta") if target.type == "meta" else contextlib.nullcontext()
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        with on_meta:
            model = RewardModel(
                config=config,
                layer_spec=block_spec(cfg, config, stage),
                vocab_size=padded_vocab_size(cfg.model),
                max_sequence_length=cfg.model.max_position_embeddings,
                rotary_base=cfg.model.rotary_base,
                rotary_scaling=rotary_scaling(cfg),
                pre_process=parallel_state.is_pipeline_first_stage(
                    ignore_virtual=False, vp_stage=stage
                ),
                post_process=parallel_state.is_pipeline_last_stage(
                    ignore_virtual=False, vp_stage=stage
                ),
                head_init_seed=cfg.training.seed,
                vp_stage=stage,
                value_head=value_head,
                num_labels=cfg.model.num_labels,
                output_layer=output_layer,
                tie_output=cfg.model.tie_word_embeddings,
                real_vocab_size=cfg.model.vocab_size,
            )
        model.to(target)
        if output_layer and target.type != "meta":
            model.setup_embeddings_and_output_layer()
        chunks.append(model)
    return chunks


def meta_sharded_state_dict(cfg: MegarmConfig) -> dict[str, object]:
    """megarm's sharded state dict for ``cfg`` at the current (TP, PP) layout, from a
    model built on the meta device: keyed by state-dict name, no weights allocated.

    Always megatron-core's local layer spec (torch_dist checkpoint keys do not
    depend on the spec). Needs megatron-core's parallel state
    (``megarm.distributed.init``).
    """
    cfg = copy.deepcopy(cfg)
    cfg.model.attention_backend = "sdpa"
    (model,) = build_model(cfg, device="meta")
    return model.sharded_state_dict()


def count_parameters(chunks: list[torch.nn.Module]) -> int:
    """Parameters held by this rank's chunks."""
    return sum(p.numel() for chunk in chunks for p in chunk.parameters())
