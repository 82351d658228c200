"""A micro-batch's share for one context-parallel rank, cut on the host.

Context parallelism (``parallel.context_parallel_size``, CP) splits every sequence
over the CP ranks of a data-parallel replica. With causal attention the end of a
sequence costs more than its start, so megatron-core's load-balanced split is used:
a sequence padded to a multiple of ``2 * CP`` is cut into ``2 * CP`` equal chunks
and rank ``r`` holds chunks ``r`` and ``2 * CP - 1 - r`` (for padded rows this is
exactly ``megatron.core.utils.get_batch_on_this_cp_rank``; a test checks it). THD
streams are split the same way per sequence, each padded to a multiple of
``2 * CP`` (and of TP under sequence parallelism), which is what transformer-engine's
THD context parallelism expects of ``cu_seqlens_q_padded``.

The cut happens in :func:`megarm.model.step.forward_step` before the batch moves to
the device, so every path (training, scoring, evaluation, serving) shares it and
no index arithmetic runs on the device. What moves with the tokens:

- ``reward_index`` becomes the position in this rank's share, or ``-1`` where the
  sequence's last token lives on another CP rank; the model sums the value head's
  output over the CP group (:func:`megarm.distributed.sum_context`), so every rank
  ends with every reward, as at CP=1.
- ``lengths`` keeps each sequence's real length (positions no longer hold it).
- ``lm_index`` / ``lm_target`` keep only the supervised positions this rank holds;
  ``lm_tokens`` is their count, so the LM sums add up over CP to the CP=1 sum.
- ``attention_mask`` (packed rows) keeps this rank's query rows and every key, in
  the global order that attention gathers K and V into.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from megarm.model.step import PairBatch


def held_positions(length: int, rank: int, size: int) -> np.ndarray:
    """Positions of a ``length``-token sequence (a multiple of ``2 * size``) that CP
    rank ``rank`` holds, in its local order: chunk ``rank``, then chunk
    ``2 * size - 1 - rank``."""
    chunk = length // (2 * size)
    second = 2 * size - 1 - rank
    return np.concatenate(
        [np.arange(rank * chunk, (rank + 1) * chunk), np.arange(second * chunk, (second + 1) * chunk)]
    )


def locate(position: Tensor, chunk: Tensor | int, size: int) -> tuple[Tensor, Tensor]:
    """``(owner CP rank, position in the owner's share)`` of global ``position``s in
    sequences cut into ``2 * size`` chunks of ``chunk`` tokens."""
    j = position // chunk
    first = j < size
    owner = torch.where(first, j, 2 * size - 1 - j)
    local = torch.where(first, position - j * chunk, chunk + position - j * chunk)
    return owner, local


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def split_batch(batch: PairBatch, rank: int, size: int, multiple: int = 1) -> PairBatch:
    """CP rank ``rank``'s share of ``batch`` (``size`` ranks); ``multiple``: the TP
    size under sequence parallelism (each rank's share must split over TP)."""
    if size == 1:
        return batch
    if batch.cu_seqlens is not None:
        return _split_thd(batch, rank, size, multiple)
    return _split_rows(batch, rank, size, multiple)


def _split_rows(batch: PairBatch, rank: int, size: int, multiple: int) -> PairBatch:
    """Padded rows (one sequence per row, or packed rows with a block mask): every
    row is cut the same way, after padding the width to a multiple of ``2 * size``."""
    rows, width = batch.tokens.shape
    full = _round_up(width, 2 * size * multiple)
    extra = full - width

    def pad(t: Tensor, value: int) -> Tensor:
        return torch.nn.functional.pad(t, (0, extra), value=value) if extra else t

    if batch.max_position is None:
        # Plain arange positions, continued into the padding; the batch stays "plain"
        # (max_position None), so the model takes its RoPE table's rows for this
        # rank's chunks as [s, 1, 1, d], which fused RoPE kernels accept.
        positions = torch.arange(full, device=batch.tokens.device).expand(rows, full)
    else:
        positions = pad(batch.position_ids, 0)
    mask = batch.attention_mask
    if mask is not None and extra:
        grown = torch.ones(rows, 1, full, full, dtype=torch.bool, device=mask.device)
        grown[:, :, :width, :width] = mask
        pads = torch.arange(width, full, device=mask.device)
        grown[:, :, pads, pads] = False  # a pad query sees itself (no all-blocked row)
        mask = grown
    keep = torch.from_numpy(held_positions(full, rank, size)).to(batch.tokens.device)
    chunk = full // (2 * size)
    owner, local = locate(batch.reward_index, chunk, size)
    lm_index, lm_target, lm_tokens = batch.lm_index, batch.lm_target, batch.lm_tokens
    if lm_index is not None:
        owner_lm, local_lm = locate(lm_index // rows, chunk, size)
        mine = owner_lm == rank
        lm_index = local_lm[mine] * rows + lm_index[mine] % rows
        lm_target = lm_target[mine]
        lm_tokens = int(mine.sum())
    return dataclasses.replace(
        batch,
        tokens=pad(batch.tokens, 0)[:, keep],
        position_ids=positions[:, keep].contiguous(),
        labels=None if batch.labels is None else pad(batch.labels, -100)[:, keep],
        attention_mask=None if mask is None else mask[:, :, keep, :],
        reward_index=torch.where(owner == rank, local, -1),
        lengths=batch.sequence_lengths(),
        lm_index=lm_index,
        lm_target=lm_target,
        lm_tokens=lm_tokens,
        context_rank=rank,
        context_size=size,
    )


def _split_thd(batch: PairBatch, rank: int, size: int, multiple: int) -> PairBatch:
    """A THD stream: every segment (the alignment padding's too) padded to a
    multiple of ``2 * size * multiple`` and cut on its own; ``cu_seqlens`` become the
    padded global boundaries (megatron-core's RoPE divides them by CP),
    ``seq_lengths`` this rank's per-segment share."""
    lengths = batch.seq_lengths
    if lengths is None:
        lengths = tuple((batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist())
    padded = [_round_up(n, 2 * size * multiple) for n in lengths]
    starts = np.cumsum([0, *lengths])
    source, position = [], []
    for start, n, p in zip(starts, lengths, padded, strict=False):
        held = held_positions(p, rank, size)
        source.append(np.where(held < n, start + held, -1))
        position.append(held)
    source_t = torch.from_numpy(np.concatenate(source))
    real = source_t >= 0
    index = source_t.clamp(min=0)
    device = batch.tokens.device
    real_d, index_d = real.to(device), index.to(device)
    tokens = torch.where(real_d, batch.tokens[0, index_d], 0)[None]
    labels = None
    if batch.labels is not None:
        labels = torch.where(real_d, batch.labels[0, index_d], -100)[None]
    padded_t = torch.tensor(padded, device=device)
    local_starts = torch.tensor(np.cumsum([0, *[p // size for p in padded]])[:-1], device=device)
    ends = torch.tensor(starts[1:], device=device)

    def place(stream: Tensor) -> tuple[Tensor, Tensor]:
        """(owner, index in this rank's stream) of positions in the unsplit stream."""
        segment = torch.searchsorted(ends, stream, right=True)
        begin = torch.tensor(starts[:-1], device=device)[segment]
        owner, local = locate(stream - begin, padded_t[segment] // (2 * size), size)
        return owner, local_starts[segment] + local

    owner, local = place(batch.reward_index)
    lm_index, lm_target, lm_tokens = batch.lm_index, batch.lm_target, batch.lm_tokens
    if lm_index is not None:
        owner_lm, local_lm = place(lm_index)
        mine = owner_lm == rank
        lm_index, lm_target, lm_tokens = local_lm[mine], lm_target[mine], int(mine.sum())
    bounds = np.cumsum([0, *padded]).astype(np.int32)
    return dataclasses.replace(
        batch,
        tokens=tokens,
        position_ids=torch.from_numpy(np.concatenate(position)).to(device)[None],
        labels=labels,
        reward_index=torch.where(owner == rank, local, -1),
        lengths=batch.sequence_lengths(),
        cu_seqlens=torch.from_numpy(bounds).to(batch.cu_seqlens.device),
        max_seqlen=max(padded),
        seq_lengths=tuple(p // size for p in padded),
        lm_index=lm_index,
        lm_target=lm_target,
        lm_tokens=lm_tokens,
        context_rank=rank,
        context_size=size,
    )
