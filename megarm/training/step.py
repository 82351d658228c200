"""``forward_step`` and the Bradley-Terry loss for megatron-core's pipeline schedules.

A micro-batch holds ``b`` preference pairs as ``2b`` rows: chosen rows first, then
rejected rows, so both go through the model in one forward. The loss of a pair is
``-logsigmoid(r_chosen - r_rejected - margin)``. ``loss_func`` returns the mean
over the micro-batch; megatron-core's schedule divides by the number of
micro-batches and DDP averages over data-parallel ranks, so the gradient is
exactly that of the mean over the global batch (every micro-batch has the same
number of pairs).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from megarm.distributed import all_reduce_host
from megarm.model.attention import PackedSegments


@dataclass
class PairBatch:
    """One micro-batch of ``b`` pairs as ``2b`` rows (chosen first, then rejected)."""

    tokens: Tensor
    """``[2b, s]`` token ids, padded."""
    position_ids: Tensor
    """``[2b, s]`` positions (restarting at 0 for every packed sequence)."""
    reward_index: Tensor
    """``[2b]`` index of each sequence's reward token (its last token) in its row."""
    margin: Tensor
    """``[b]`` Bradley-Terry margin per pair (zeros when the data has none)."""
    labels: Tensor | None = None
    """``[2b, s]`` response labels (-100 over prompt and padding), kept for an
    auxiliary LM loss."""
    attention_mask: Tensor | None = None
    """``[rows, 1, s, s]`` bool, True where attention is blocked; ``None`` = causal."""
    reward_row: Tensor | None = None
    """``[2b]`` row holding each sequence's reward token when sequences are packed
    (``data.packing``; then ``reward_index`` is the position within that row and
    ``tokens`` has ``rows <= 2b`` rows); ``None``: sequence ``i`` is row ``i``."""
    cu_seqlens: Tensor | None = None
    """``[n + 1]`` int32 segment boundaries of a THD-packed micro-batch (one row
    holding every sequence end to end); ``None`` for the other layouts."""
    max_seqlen: int | None = None
    """Longest segment of a THD-packed micro-batch."""
    seq_lengths: tuple[int, ...] | None = None
    """Host copy of the THD segment lengths (``diff(cu_seqlens)``), so attention
    splits the stream without reading ``cu_seqlens`` back from the device."""
    max_position: int | None = None
    """Largest position id when positions restart per packed sequence (packed
    rows); ``None``: every row is ``arange(s)``. A host int, so the model picks its
    RoPE path without a device sync."""

    def packed_seq_params(self) -> PackedSegments | None:
        """megatron-core's THD description of this micro-batch, or ``None``."""
        if self.cu_seqlens is None:
            return None
        return PackedSegments(
            qkv_format="thd",
            cu_seqlens_q=self.cu_seqlens,
            cu_seqlens_kv=self.cu_seqlens,
            max_seqlen_q=self.max_seqlen,
            max_seqlen_kv=self.max_seqlen,
            seq_lengths=self.seq_lengths,
        )

    @property
    def num_pairs(self) -> int:
        """Pairs in this micro-batch."""
        return self.margin.shape[0]

    def to(self, device: torch.device) -> PairBatch:
        """Move every tensor to ``device`` (asynchronously from pinned memory)."""
        moved = {
            f.name: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v)
            for f in fields(self)
            for v in [getattr(self, f.name)]
        }
        return PairBatch(**moved)


# Per-micro-batch sums reduced over data-parallel ranks for metrics.
STAT_KEYS = (
    "loss_sum",
    "correct",
    "pairs",
    "chosen_sum",
    "chosen_sq",
    "rejected_sum",
    "rejected_sq",
    "gap_sum",
    "tokens",
    "tokens_sq",
)


def pairwise_loss(rewards: Tensor, margin: Tensor) -> tuple[Tensor, Tensor]:
    """Per-pair Bradley-Terry loss and reward gap from ``[2b]`` rewards (in fp32)."""
    chosen, rejected = rewards.float().chunk(2)
    gap = chosen - rejected
    return -F.logsigmoid(gap - margin.float()), gap


def sequence_lengths(batch: PairBatch) -> Tensor:
    """``[2b]`` real tokens of each sequence: the position of its reward token + 1
    (positions restart per packed sequence, so this holds packed or not)."""
    rows = (
        torch.arange(batch.reward_index.shape[0], device=batch.reward_index.device)
        if batch.reward_row is None
        else batch.reward_row
    )
    return batch.position_ids[rows, batch.reward_index] + 1


def loss_func(batch: PairBatch, rewards: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean pairwise loss of the micro-batch, plus sums for the step's metrics."""
    losses, gap = pairwise_loss(rewards, batch.margin)
    # Sums in float64: token counts squared pass fp32's exact integers (2^24) quickly.
    lengths = sequence_lengths(batch).double()
    chosen, rejected = rewards.detach().double().chunk(2)
    stats = torch.stack(
        [
            losses.detach().double().sum(),
            (gap.detach() > 0).double().sum(),
            # A fill on the device; torch.tensor(n, device=cuda) would be a blocking copy.
            torch.full((), float(batch.num_pairs), dtype=torch.float64, device=rewards.device),
            chosen.sum(),
            (chosen * chosen).sum(),
            rejected.sum(),
            (rejected * rejected).sum(),
            gap.detach().double().sum(),
            lengths.sum(),
            (lengths**2).sum(),
        ]
    )
    return losses.mean(), {"stats": stats, "rewards": rewards.detach()}


def forward_step(data_iterator: Iterator[PairBatch], model: torch.nn.Module):
    """megatron-core forward step: every pipeline stage reads the same micro-batch.

    Batches arrive on the host (pinned on CUDA) and move to the model's device here,
    asynchronously, one micro-batch at a time.
    """
    batch: PairBatch = next(data_iterator)
    batch = batch.to(next(model.parameters()).device)
    output = model(
        batch.tokens,
        batch.position_ids,
        batch.attention_mask,
        batch.reward_index,
        reward_row=batch.reward_row,
        packed_seq_params=batch.packed_seq_params(),
        plain_positions=batch.max_position is None,
        max_position=batch.max_position,
    )
    return output, partial(loss_func, batch)


def reduce_stats(outputs: list[dict[str, Tensor]], contribute: bool = True) -> dict[str, float]:
    """Sum the micro-batches' stats over all ranks and turn them into metrics.

    ``outputs`` is what the schedule returned on this rank. Exactly one rank per
    data-parallel replica must ``contribute`` (TP rank 0 of the last pipeline
    stage); the others add zeros, so every rank ends with the same numbers. The
    sums leave the device in one copy, after the schedule, and are reduced on the
    host group (:func:`megarm.distributed.all_reduce_host`).
    """
    total = torch.zeros(len(STAT_KEYS), dtype=torch.float64)
    if contribute and outputs:
        total += torch.stack([out["stats"].detach() for out in outputs]).sum(0).cpu()
    s = dict(zip(STAT_KEYS, all_reduce_host(total).tolist(), strict=True))
    n = max(s["pairs"], 1.0)
    chosen_mean, rejected_mean = s["chosen_sum"] / n, s["rejected_sum"] / n
    return {
        "loss": s["loss_sum"] / n,
        "accuracy": s["correct"] / n,
        "chosen_reward": chosen_mean,
        "chosen_reward_std": max(s["chosen_sq"] / n - chosen_mean**2, 0.0) ** 0.5,
        "rejected_reward": rejected_mean,
        "rejected_reward_std": max(s["rejected_sq"] / n - rejected_mean**2, 0.0) ** 0.5,
        "reward_gap": s["gap_sum"] / n,
        "pairs": s["pairs"],
        "tokens": s["tokens"],
        "tokens_sq": s["tokens_sq"],
    }
