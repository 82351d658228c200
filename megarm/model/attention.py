"""Core attention on ``torch.nn.functional.scaled_dot_product_attention``.

megatron-core's local ``DotProductAttention`` materialises the whole ``[b, h, s, s]``
score matrix; without transformer-engine there is no fused path. This module is a
drop-in replacement for it in the local layer spec: flash / memory-efficient kernels
on GPU, the fused kernel on CPU, grouped-query attention without repeating K/V.
The kernels SDPA may use are chosen in :mod:`megarm.platform.attention_kernels`
(flash > memory-efficient > math; cuDNN only on request).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from megatron.core import parallel_state, tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right

from megarm.distributed import gather_context
from megarm.platform.attention_kernels import max_mask_elements, sdpa_context


@dataclass
class PackedSegments(PackedSeqParams):
    """megatron-core's THD ``PackedSeqParams`` plus the segment lengths as host ints,
    which the collate step knows: :class:`SDPAttention` splits the stream with them
    instead of reading ``cu_seqlens`` back from the GPU in every layer."""

    seq_lengths: tuple[int, ...] | None = None
    rope_cos: Tensor | None = None
    """``[t, 1, d]`` RoPE cosines of every token of the stream, computed once per
    micro-batch (:func:`with_packed_rope`); :class:`SDPAttention` then rotates query
    and key itself and megatron-core is given no ``rotary_pos_emb``."""
    rope_sin: Tensor | None = None
    """``[t, 1, d]`` the matching sines."""


def rope_in_sdpa(config: TransformerConfig) -> bool:
    """:class:`SDPAttention` may apply RoPE on the THD path from per-micro-batch
    cos/sin: plain (non-interleaved, unscaled-magnitude) RoPE over the whole head,
    no context parallelism, no fused RoPE kernel: exactly megatron-core's unfused
    ``_apply_rotary_pos_emb_bshd`` with ``mscale`` 1."""
    return (
        config.context_parallel_size == 1
        and not config.rotary_interleaved
        and not config.apply_rope_fusion
        and not getattr(config, "multi_latent_attention", False)
    )


def with_packed_rope(packed: PackedSegments, freqs: Tensor, position_ids: Tensor) -> PackedSegments:
    """``packed`` plus each token's RoPE cos/sin: ``freqs`` ``[n, 1, 1, d]`` (from
    megatron-core's RotaryEmbedding) at ``position_ids`` ``[1, t]`` (positions
    restart at every packed sequence, as megatron-core's per-segment RoPE counts).
    Once per micro-batch instead of, in every layer for query and key, a device sync
    on ``cu_seqlens``, a split + cat of the frequencies and their cos and sin."""
    per_token = freqs[:, 0][position_ids[0].to(freqs.device)]  # [t, 1, d]
    return dataclasses.replace(packed, rope_cos=torch.cos(per_token), rope_sin=torch.sin(per_token))


def _rotate(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """megatron-core's unfused RoPE on ``[t, n, d]`` (the same fp32 operations, so
    bitwise equal): ``t * cos + rotate_half(t) * sin``."""
    x1, x2 = torch.chunk(t, 2, dim=-1)
    return t * cos.to(t.dtype) + torch.cat((-x2, x1), dim=-1) * sin.to(t.dtype)


class SDPAttention(MegatronModule):
    """Same constructor and ``forward`` contract as megatron-core's DotProductAttention.

    Inputs are ``[s, b, heads_per_rank, d]`` (query) and ``[s, b, groups_per_rank, d]``
    (key, value); the output is ``[s, b, heads_per_rank * d]``. ``attention_mask`` is
    megatron's convention: bool, True where attention is blocked, or ``None`` for
    causal attention. With THD ``packed_seq_params`` the inputs are ``[t, n, d]``
    (megatron-core drops the batch dimension) and attention is causal within each
    ``cu_seqlens`` segment; the output is ``[t, heads_per_rank * d]``.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ) -> None:
        super().__init__(config=config)
        self.cp = config.context_parallel_size
        tp = config.tensor_model_parallel_size
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups or config.num_attention_heads, tp)
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params=None,
    ) -> Tensor:
        """Attention over ``[s, b, n, d]`` inputs; returns ``[s, b, n * d]``."""
        if attention_bias is not None:
            raise ValueError("SDPAttention does not take attention_bias")
        with sdpa_context():  # flash > memory-efficient > math, once per call
            if packed_seq_params is not None:
                if packed_seq_params.qkv_format != "thd":
                    raise ValueError(
                        f"SDPAttention packs only thd, not {packed_seq_params.qkv_format}")
                if self.cp > 1:
                    return self._context_segments(query, key, value, packed_seq_params)
                return self._segments(query, key, value, packed_seq_params)
            if self.cp > 1:
                return self._context_rows(query, key, value, attention_mask)
            return self._attend(query, key, value, attention_mask, attn_mask_type)

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                attn_mask_type: AttnMaskType | None, lower_right: bool = False) -> Tensor:
        """``[s, b, n, d]`` -> ``[s, b, n * d]``, inside the caller's :func:`sdpa_context`.
        ``lower_right``: causal with the queries aligned to the *last* keys (queries
        that are the end of a longer key sequence, as under context parallelism)."""
        sq, b = query.shape[0], query.shape[1]
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask_type = attn_mask_type or self.attn_mask_type
        causal = attention_mask is None and mask_type == AttnMaskType.causal
        mask = None if attention_mask is None else attention_mask.logical_not()
        if lower_right and causal and sq != k.shape[2]:
            causal, mask = False, causal_lower_right(sq, k.shape[2])
        dropout = self.dropout if self.training else 0.0
        # Dropout inside the TP region draws from the model-parallel RNG stream,
        # as megatron-core's DotProductAttention does.
        rng = (
            tensor_parallel.get_cuda_rng_tracker().fork()
            if dropout > 0 and not self.config.sequence_parallel
            else contextlib.nullcontext()
        )
        with rng:
            context = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=dropout,
                is_causal=causal,
                scale=self.softmax_scale,
                enable_gqa=self.heads != self.groups,
            )
        # [b, n, s, d] -> [s, b, n * d]
        return context.permute(2, 0, 1, 3).reshape(sq, b, -1)

    def _segments(self, query: Tensor, key: Tensor, value: Tensor, packed: PackedSeqParams) -> Tensor:
        """THD ``[t, n, d]`` -> ``[t, n * d]``: causal attention within each
        ``cu_seqlens`` segment, one SDPA call per segment (cost sum(s_i^2), and the
        flash kernel stays usable; a dense t x t block mask would cost t^2). The
        lengths come from :class:`PackedSegments` when the caller has them on the
        host; otherwise they are read from ``cu_seqlens`` (a device sync)."""
        lengths = getattr(packed, "seq_lengths", None)
        if lengths is None:
            cu_seqlens = packed.cu_seqlens_q
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        if sum(lengths) != query.shape[0]:
            raise ValueError(
                f"the packed segments hold {sum(lengths)} tokens, the stream has "
                f"{query.shape[0]}"
            )
        cos = getattr(packed, "rope_cos", None)
        if cos is not None:  # RoPE from the micro-batch's cos/sin (with_packed_rope)
            query, key = _rotate(query, cos, packed.rope_sin), _rotate(key, cos, packed.rope_sin)
        parts = [
            self._attend(q[:, None], k[:, None], v[:, None], None, AttnMaskType.causal)[:, 0]
            for q, k, v in zip(
                query.split(list(lengths)),
                key.split(list(lengths)),
                value.split(list(lengths)),
                strict=True,
            )
        ]
        return torch.cat(parts)

    # ------------------------------------------------------------------ context parallelism
    #
    # Without transformer-engine, CP attention all-gathers K and V over the CP group
    # (megatron-core's "all_gather" CP scheme; the backward reduce-scatters) rather than
    # passing them round a ring: one collective per layer, each rank's queries then
    # attend with plain SDPA calls, and GQA K/V (groups < heads) stay small to gather.
    # A rank's queries are two chunks of each sequence (megarm.model.context_split):
    # chunk r attends to the global keys up to its end, chunk 2CP-1-r likewise, each
    # causal with the queries aligned to the last keys (lower right).

    def _global_order(self, gathered: Tensor) -> Tensor:
        """``[cp, 2c, ...]`` (each rank's two chunks) -> ``[2 cp c, ...]`` in sequence
        order: rank j's first chunk is chunk j, its second chunk 2cp-1-j."""
        local = gathered.shape[1]
        halves = gathered.unflatten(1, (2, local // 2))
        first = halves[:, 0].flatten(0, 1)
        second = halves[:, 1].flip(0).flatten(0, 1)
        return torch.cat([first, second])

    def _context_rows(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None) -> Tensor:
        """Padded rows cut for CP: ``[2c, b, n, d]`` queries against the whole rows'
        keys. With a mask (packed rows) its query rows are this rank's and its keys in
        sequence order already, so one call takes it."""
        group = parallel_state.get_context_parallel_group()
        keys = self._global_order(gather_context(key, group))
        values = self._global_order(gather_context(value, group))
        if mask is not None:
            return self._attend(query, keys, values, mask, AttnMaskType.causal)
        return torch.cat(self._two_chunks(query, keys, values))

    def _two_chunks(self, query: Tensor, keys: Tensor, values: Tensor) -> list[Tensor]:
        """This rank's two query chunks of one sequence against its full keys."""
        rank = parallel_state.get_context_parallel_rank()
        chunk = query.shape[0] // 2
        ends = ((rank + 1) * chunk, (2 * self.cp - rank) * chunk)
        return [self._causal_tail(q, keys, values, end) for q, end in zip(query.split(chunk), ends, strict=True)]

    def _causal_tail(self, query: Tensor, keys: Tensor, values: Tensor, end: int) -> Tensor:
        """Queries that are positions ``end - len(query) .. end - 1`` of a sequence,
        causal over its keys ``[:end]``; in query blocks where the device would
        materialise the mask (:func:`max_mask_elements`), each block then the tail
        of a shorter key range (row by row the same softmax)."""
        n = query.shape[0]
        limit = max_mask_elements(query.device)
        step = n if limit is None or n * end <= limit else max(1, limit // end)
        # Where the mask is materialised, autograd would keep it (query x key bools)
        # for the backward, more than the activations CP saves: such calls are
        # recomputed in the backward instead (the mask lives only inside one call).
        recompute = limit is not None and torch.is_grad_enabled()
        parts = []
        for start in range(0, n, step):
            stop = end - (n - min(n, start + step))
            block = query[start : start + step]
            args = (block, keys[:stop], values[:stop], None, AttnMaskType.causal, True)
            if recompute and block.shape[0] != stop:  # a lower-right mask: materialised
                parts.append(torch.utils.checkpoint.checkpoint(self._attend, *args, use_reentrant=False))
            else:
                parts.append(self._attend(*args))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _context_segments(self, query: Tensor, key: Tensor, value: Tensor,
                          packed: PackedSeqParams) -> Tensor:
        """A THD stream cut for CP: ``seq_lengths`` are this rank's share of each
        segment (two chunks); K and V are gathered once for the whole stream."""
        lengths = list(packed.seq_lengths)
        group = parallel_state.get_context_parallel_group()
        keys, values = gather_context(key, group), gather_context(value, group)
        parts: list[Tensor] = []
        start = 0
        for n in lengths:
            piece = slice(start, start + n)
            k = self._global_order(keys[:, piece])[:, None]
            v = self._global_order(values[:, piece])[:, None]
            parts += [p[:, 0] for p in self._two_chunks(query[piece][:, None], k, v)]
            start += n
        return torch.cat(parts)
