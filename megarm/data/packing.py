"""Sequence packing: a micro-batch's ``2b`` sequences in as few rows as possible.

Without packing a micro-batch of ``b`` pairs is ``2b`` rows, each right-padded to the
longest sequence, so short sequences next to a long one are mostly padding. With
``data.packing`` the same ``2b`` sequences (the micro-batch still holds exactly
``micro_batch_size`` pairs, so the loss and its gradient are unchanged) are placed
first-fit-decreasing into rows of at most ``seq_length`` tokens:

* positions restart at 0 for every packed sequence (RoPE sees each one from 0);
* attention is block-diagonal causal: a token attends to earlier tokens of its own
  sequence only; a padding position attends to itself only (a fully blocked query
  row would make softmax NaN);
* each sequence's reward is read at ``(reward_row[i], reward_index[i])``, its last
  token; entries stay in the unpacked order (chosen of pairs ``0..b-1``, then
  rejected), so the pairwise loss is computed exactly as without packing.

The mask is a dense ``[rows, 1, s, s]`` bool tensor (True = blocked, megatron-core's
convention): ``rows * s * s`` bytes, e.g. 16 MiB per row at ``s = 4096``.

:func:`collate_thd` is the other layout (``data.packed_format: thd``): all ``2b``
sequences end to end in one stream with ``cu_seqlens`` boundaries, megatron-core's
THD format, which transformer-engine's varlen attention (and megarm's SDPA) read
directly: no mask tensor and no padding between rows.

Pure numpy / torch; no megatron-core import.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from megarm.data.dataset import sample_margins, sample_ranks, sample_rows

IGNORE_INDEX = -100


def pack_lengths(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing bin packing of sequence ``lengths`` into rows of at most
    ``capacity`` tokens.

    Sequences are taken longest first (ties: lower index first) and each goes into the
    first row with room for it, else a new row. Returns the rows as lists of sequence
    indices in the order they were placed, which is the order they sit in the row.
    Deterministic: the same lengths always give the same layout.
    """
    lengths = [int(n) for n in lengths]
    if any(n < 1 for n in lengths):
        raise ValueError(f"cannot pack empty sequences: lengths {lengths}")
    if lengths and max(lengths) > capacity:
        raise ValueError(
            f"a sequence of {max(lengths)} tokens exceeds seq_length {capacity}; re-run "
            f"tools/preprocess_data.py with --seq-length {capacity}"
        )
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def row_width(rows: list[list[int]], lengths: Sequence[int], pad_to_multiple_of: int = 1) -> int:
    """Width of the packed batch: the longest row, rounded up to ``pad_to_multiple_of``."""
    longest = max(sum(lengths[i] for i in row) for row in rows)
    return -(-longest // pad_to_multiple_of) * pad_to_multiple_of


def segment_ids(rows: list[list[int]], lengths: Sequence[int], width: int) -> np.ndarray:
    """``[rows, width]`` int64: the sequence index at each position; padding position
    ``p`` gets ``-(p + 1)``, an id of its own, so it attends to itself only."""
    seg = -(np.arange(width, dtype=np.int64) + 1)[None, :].repeat(len(rows), axis=0)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            seg[r, start : start + lengths[i]] = i
            start += lengths[i]
    return seg


def packed_position_ids(rows: list[list[int]], lengths: Sequence[int], width: int) -> np.ndarray:
    """``[rows, width]`` int64 positions restarting at 0 for every sequence; padding
    continues from the row's last sequence (any value works: it is never read)."""
    pos = np.zeros((len(rows), width), dtype=np.int64)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            pos[r, start : start + lengths[i]] = np.arange(lengths[i])
            start += lengths[i]
        pos[r, start:] = np.arange(width - start)
    return pos


def block_causal_mask(segments: Any) -> Any:
    """``[rows, 1, s, s]`` bool mask from ``[rows, s]`` segment ids, True where query
    ``i`` may *not* attend key ``j``: a different segment, or ``j > i``."""
    import torch

    seg = torch.as_tensor(segments)
    s = seg.shape[-1]
    other = seg[:, :, None] != seg[:, None, :]
    future = torch.ones(s, s, dtype=torch.bool).triu(1)
    return (other | future).unsqueeze(1)


def _sequences(samples: Sequence[dict[str, Any]]) -> tuple[list, list, list[int]]:
    """Token ids, labels and lengths of a micro-batch's ``2b`` sequences: chosen of
    pairs ``0..b-1`` first, then rejected (the order rewards and the loss use); or
    the ``b`` sequences of SFT records."""
    seqs, labels = sample_rows(samples)
    return seqs, labels, [len(x) for x in seqs]


def _margins(samples: Sequence[dict[str, Any]]) -> Any:
    return sample_margins(samples)


def collate_packed(
    samples: Sequence[dict[str, Any]],
    pad_token_id: int,
    seq_length: int,
    pad_to_multiple_of: int = 1,
) -> dict[str, Any]:
    """Micro-batch of ``b`` pairs with their ``2b`` sequences packed into rows.

    Returns ``tokens``, ``labels`` (-100 over padding), ``position_ids`` ``[rows, s]``,
    ``attention_mask`` ``[rows, 1, s, s]`` (bool, True = blocked), ``reward_index`` and
    ``reward_row`` ``[2b]`` (sequence ``i``'s last token is at
    ``tokens[reward_row[i], reward_index[i]]``; chosen of pairs ``0..b-1`` first, then
    rejected), ``lengths`` ``[2b]`` and ``margin`` ``[b]``.
    """
    import torch

    if not samples:
        raise ValueError("collate_packed needs at least one pair")
    seqs, label_seqs, lengths = _sequences(samples)
    rows = pack_lengths(lengths, seq_length)
    width = row_width(rows, lengths, pad_to_multiple_of)
    tokens = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    reward_index = torch.zeros(len(seqs), dtype=torch.long)
    reward_row = torch.zeros(len(seqs), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            n = lengths[i]
            tokens[r, start : start + n] = torch.from_numpy(np.asarray(seqs[i], dtype=np.int64))
            labels[r, start : start + n] = torch.from_numpy(
                np.asarray(label_seqs[i], dtype=np.int64)
            )
            reward_row[i] = r
            reward_index[i] = start + n - 1
            start += n
    return {
        "tokens": tokens,
        "labels": labels,
        "position_ids": torch.from_numpy(packed_position_ids(rows, lengths, width)),
        "attention_mask": block_causal_mask(segment_ids(rows, lengths, width)),
        "reward_index": reward_index,
        "reward_row": reward_row,
        "lengths": torch.tensor(lengths, dtype=torch.long),
        "margin": _margins(samples),
        **sample_ranks(samples),
    }


def cu_seqlens(lengths: Sequence[int], total: int) -> np.ndarray:
    """``[n + 1]`` int32 cumulative boundaries of ``lengths`` laid end to end, plus one
    more segment for the alignment padding up to ``total`` when there is any (it
    attends only to itself and is never read)."""
    ends = np.cumsum([0, *lengths], dtype=np.int64)
    if total < ends[-1]:
        raise ValueError(f"{int(ends[-1])} tokens do not fit in a stream of {total}")
    if total > ends[-1]:
        ends = np.append(ends, total)
    return ends.astype(np.int32)


def collate_thd(
    samples: Sequence[dict[str, Any]],
    pad_token_id: int,
    pad_to_multiple_of: int = 1,
) -> dict[str, Any]:
    """Micro-batch of ``b`` pairs as one stream: the ``2b`` sequences end to end
    (megatron-core's THD layout, batch dimension 1), padded only to a multiple of
    ``pad_to_multiple_of`` (the TP size under sequence parallelism).

    Returns ``tokens``, ``labels``, ``position_ids`` ``[1, T]`` (positions restart
    per sequence), ``cu_seqlens`` ``[n + 1]`` int32 and ``max_seqlen`` (attention
    stays within each segment), ``reward_index`` ``[2b]`` (each sequence's last
    token; chosen of pairs ``0..b-1`` first, then rejected), ``reward_row`` (zeros),
    ``lengths`` ``[2b]`` and ``margin`` ``[b]``.
    """
    import torch

    if not samples:
        raise ValueError("collate_thd needs at least one pair")
    seqs, label_seqs, lengths = _sequences(samples)
    if min(lengths) < 1:
        raise ValueError(f"cannot pack empty sequences: lengths {lengths}")
    used = sum(lengths)
    total = -(-used // pad_to_multiple_of) * pad_to_multiple_of
    tokens = np.full(total, pad_token_id, dtype=np.int64)
    labels = np.full(total, IGNORE_INDEX, dtype=np.int64)
    tokens[:used] = np.concatenate([np.asarray(x, dtype=np.int64) for x in seqs])
    labels[:used] = np.concatenate([np.asarray(x, dtype=np.int64) for x in label_seqs])
    bounds = cu_seqlens(lengths, total)
    positions = np.concatenate(
        [np.arange(int(n), dtype=np.int64) for n in np.diff(bounds.astype(np.int64))]
    )
    return {
        "tokens": torch.from_numpy(tokens)[None],
        "labels": torch.from_numpy(labels)[None],
        "position_ids": torch.from_numpy(positions)[None],
        "cu_seqlens": torch.from_numpy(bounds),
        "max_seqlen": int(np.diff(bounds).max()),
        "reward_index": torch.from_numpy(bounds[1 : len(seqs) + 1].astype(np.int64) - 1),
        "reward_row": torch.zeros(len(seqs), dtype=torch.long),
        "lengths": torch.tensor(lengths, dtype=torch.long),
        "margin": _margins(samples),
        **sample_ranks(samples),
    }
