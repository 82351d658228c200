"""Training FLOPs of a reward model, for TFLOP/s and MFU.

Per real (non-pad) token a dense transformer spends ``6 N`` FLOPs in forward and
backward matmuls, where ``N`` counts the matmul parameters (QKV, output
projection, MLP, value head; not the embedding lookup). Attention scores and
their product with the values add ``12 L h s`` per token of a length-``s``
sequence (forward + backward, full square as Megatron-LM counts it), i.e.
``12 L h sum(s_i^2)`` per batch. A reward model has no vocabulary projection, so
there is no ``6 h V`` logits term: counting one would inflate MFU by ~10-25%.

A mixture-of-experts layer counts its *active* parameters: the router, the
``moe_router_topk`` experts each token runs through and the shared expert (with its
gate), not the experts a token skips.
"""

from __future__ import annotations

from megarm.config import MegarmConfig
from megarm.families.base import head_dim

# Dense bf16 peak (TFLOP/s) for MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def matmul_parameters(cfg: MegarmConfig) -> int:
    """Parameters that take part in matmuls (everything but the embedding and norms)."""
    m = cfg.model
    d = head_dim(m)
    qkv = m.hidden_size * (m.num_attention_heads + 2 * m.num_query_groups) * d
    proj = m.num_attention_heads * d * m.hidden_size
    mlp = 3 * m.hidden_size * m.ffn_hidden_size
    if m.num_moe_experts:
        shared = m.moe_shared_expert_intermediate_size or 0
        mlp = m.hidden_size * (
            m.num_moe_experts  # router
            + 3 * m.moe_router_topk * (m.moe_ffn_hidden_size or 0)
            + 3 * shared + (1 if shared else 0)  # shared expert and its gate
        )
    return m.num_layers * (qkv + proj + mlp) + m.hidden_size  # + value head


def training_flops(cfg: MegarmConfig, tokens: float, tokens_sq: float) -> float:
    """FLOPs of one training step over ``tokens`` real tokens with ``sum(s_i^2)``
    = ``tokens_sq``."""
    m = cfg.model
    attention = 12.0 * m.num_layers * m.num_attention_heads * head_dim(m) * tokens_sq
    return 6.0 * matmul_parameters(cfg) * tokens + attention


def peak_tflops(device_name: str) -> float | None:
    """Peak dense bf16 TFLOP/s of a GPU by name (None when unknown)."""
    for key, value in PEAK_TFLOPS.items():
        if key in device_name:
            return value
    return None
