"""RMSNorm for the local layer spec, with sequence-parallel support.

megatron-core's ``WrappedTorchNorm`` refuses sequence parallelism because its
weight gradient must then be summed over tensor-parallel ranks. This norm marks
its weight ``sequence_parallel`` so megatron-core's ``finalize_model_grads`` does
that all-reduce, and computes exactly like HF's ``Qwen2RMSNorm`` (fp32 statistics,
weight applied in the input dtype) so converted models match transformers.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor


class RMSNorm(torch.nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dimension."""

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-6,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "RMSNorm",
    ) -> None:
        super().__init__()
        if config.normalization != "RMSNorm" or zero_centered_gamma:
            raise ValueError("megarm's norm is a plain RMSNorm (Qwen2)")
        self.eps = eps
        self.weight = torch.nn.Parameter(
            torch.ones(hidden_size, dtype=config.params_dtype)
        )
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``x`` over its last dimension."""
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)
