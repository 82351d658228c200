"""Token rows -> micro-batches -> rewards, through the model's own step.

:func:`plan_batches` groups rows by padded tokens, longest first; :func:`make_batches`
pads them with training's ``collate_pairs``; :func:`run_model` runs them under
megatron-core's pipeline schedule, forward only, at any TP/PP.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from megatron.core import parallel_state as ps
from megatron.core.utils import get_model_config
from torch import Tensor

from megarm import distributed, platform
from megarm.data.dataset import collate_pairs
from megarm.model.step import PairBatch, holds_rewards, run_schedule


def plan_batches(
    lengths: Sequence[int], max_tokens: int, max_rows: int | None = None
) -> list[list[int]]:
    """Row indices grouped into micro-batches, longest rows first, each holding at most
    ``max_tokens`` padded tokens (rows x longest row) and ``max_rows`` rows; a row
    longer than ``max_tokens`` goes alone."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for index in order:
        current = batches[-1] if batches else None
        if (
            current is not None
            and (len(current) + 1) * lengths[current[0]] <= max_tokens
            and (max_rows is None or len(current) < max_rows)
        ):
            current.append(index)
        else:
            batches.append([index])
    return batches


@dataclass
class ScoreBatch:
    """One scoring micro-batch: right-padded rows and the global number of each row."""

    tokens: Tensor
    position_ids: Tensor
    reward_index: Tensor
    rows: Tensor
    """``[n]`` global row number of each row (``-1``: a filler row, reward dropped)."""
    attention_mask: Tensor | None = None

    def pair_batch(self) -> PairBatch:
        """Training's micro-batch for these rows. Training pairs row ``i`` with row
        ``i + n/2``; here that is only a layout (the pair loss is computed and
        ignored), so an odd batch gets one filler copy of its last row."""
        tokens, positions, index = self.tokens, self.position_ids, self.reward_index
        mask = self.attention_mask
        if tokens.shape[0] % 2:
            tokens, positions, index = (torch.cat([t, t[-1:]]) for t in (tokens, positions, index))
            mask = None if mask is None else torch.cat([mask, mask[-1:]])
        batch = PairBatch(
            tokens=tokens,
            position_ids=positions,
            reward_index=index,
            margin=torch.zeros(tokens.shape[0] // 2),
            attention_mask=mask,
        )
        return batch.to(platform.device())


def make_batches(
    rows: Sequence[Sequence[int]],
    pad_id: int,
    max_tokens: int,
    max_rows: int | None = None,
    pad_to_multiple_of: int = 1,
) -> list[ScoreBatch]:
    """Micro-batches of ``rows`` (see :func:`plan_batches`), padded by training's
    ``collate_pairs`` (the first half of a batch as "chosen", the rest as "rejected";
    the width a multiple of ``pad_to_multiple_of``, as sequence parallelism needs)."""
    batches = []
    for ids in plan_batches([len(r) for r in rows], max_tokens, max_rows):
        half = (len(ids) + 1) // 2
        first, second = ids[:half], ids[half:] + ids[len(ids) - 1 :] * (len(ids) % 2)
        samples = []
        for a, b in zip(first, second, strict=True):
            chosen, rejected = np.asarray(rows[a]), np.asarray(rows[b])
            samples.append(
                {
                    "chosen_input_ids": chosen,
                    "chosen_labels": chosen,
                    "rejected_input_ids": rejected,
                    "rejected_labels": rejected,
                }
            )
        collated = collate_pairs(samples, pad_id, pad_to_multiple_of=pad_to_multiple_of)
        order = first + second
        filler = [-1] if len(ids) % 2 else []
        keep = len(order) - len(filler)
        seq = collated["tokens"].shape[1]
        batches.append(
            ScoreBatch(
                tokens=collated["tokens"][:keep],
                position_ids=torch.arange(seq).expand(keep, seq).contiguous(),
                reward_index=collated["lengths"][:keep] - 1,
                rows=torch.tensor(order[:keep]),
            )
        )
    return batches


def run_model(model: list[torch.nn.Module], batches: list[ScoreBatch]) -> dict[int, float]:
    """Rewards by row number for ``batches`` through the model's step under
    megatron-core's pipeline schedule (forward only), on the ranks that report rewards
    (TP and CP rank 0 of the last stage); an empty dict elsewhere."""
    if not batches:
        return {}
    for chunk in model:
        chunk.eval()
    pair_batches = [b.pair_batch() for b in batches]
    with torch.no_grad():
        outputs = run_schedule(model, pair_batches, forward_only=True)
    if not holds_rewards():
        return {}
    found: dict[int, float] = {}
    for batch, out in zip(batches, outputs, strict=True):
        rewards = out["rewards"].float().cpu().tolist()
        found.update(zip(batch.rows.tolist(), rewards[: batch.rows.shape[0]], strict=True))
    return found


def model_rewards(
    model: list[torch.nn.Module], rows: list[list[int]], pad_id: int, max_tokens: int = 16384
) -> list[float]:
    """Rewards of ``rows`` from a model built in this process group, e.g. training's
    (every rank calls it with the same rows and gets every reward, in order)."""
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    # Sequence parallelism scatters the sequence over the TP ranks.
    sp = get_model_config(model[0]).sequence_parallel
    multiple = ps.get_tensor_model_parallel_world_size() if sp else 1
    batches = make_batches(rows, pad_id, max_tokens, pad_to_multiple_of=multiple)
    found = run_model(model, batches[dp_rank::dp])
    merged: dict[int, float] = {}
    for part in distributed.all_gather_objects(found):
        merged.update(part)  # type: ignore[arg-type]
    return [merged[i] for i in range(len(rows))]
