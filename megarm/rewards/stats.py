"""Reward statistics: the mean and std of a model's rewards over a set of pairs,
stored with the model so that RLHF frameworks can normalise its rewards.

The rewards are the chosen and the rejected reward of every pair, pooled (as
OpenRLHF computes ``config.mean``/``config.std`` after training); the std is the
unbiased one, clamped at 1e-8. Training writes them into its last checkpoint when
it ends (:func:`after_training`); ``python -m megarm.reward_stats`` computes them
for any checkpoint or export.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from megarm import distributed
from megarm.checkpoint.layout import resolve_checkpoint
from megarm.checkpoint.metadata import write_checkpoint_stats
from megarm.config import MegarmConfig
from megarm.errors import ScoringError
from megarm.rewards.batches import model_rewards


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and (unbiased, as OpenRLHF) standard deviation, clamped at 1e-8."""
    if len(values) < 2:
        raise ScoringError(f"reward statistics need at least 2 rewards, got {len(values)}")
    mean = math.fsum(values) / len(values)
    var = math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, max(math.sqrt(var), 1e-8)


def summarize(rewards: Sequence[float], source: str) -> dict[str, Any]:
    """The stored record: mean, std, how many rewards, and from what."""
    mean, std = mean_std(rewards)
    return {"mean": mean, "std": std, "count": len(rewards), "source": source}


def dataset_rows(dataset: Any) -> list[list[int]]:
    """Every pair's chosen and rejected token row of a preprocessed split (every
    response of a ranked record)."""
    from megarm.data.dataset import sample_rows

    rows = []
    for i in range(len(dataset)):
        rows += [row.tolist() for row in sample_rows([dataset[i]])[0]]
    return rows


def after_training(
    model: list[torch.nn.Module], valid: Any, pad_id: int, cfg: MegarmConfig
) -> dict[str, Any] | None:
    """At the end of training (every rank): the reward statistics over the validation
    split, written into the last checkpoint; ``None`` without a split or a save dir."""
    if valid is None or len(valid) == 0 or not cfg.checkpoint.save:
        return None
    rewards = model_rewards(model, dataset_rows(valid), pad_id)
    stats = summarize(rewards, f"validation split of {cfg.data.data_path or 'synthetic pairs'}")
    if distributed.LaunchEnv.from_environ().rank == 0:
        path = write_checkpoint_stats(resolve_checkpoint(cfg.checkpoint.save), stats)
        print(f"reward mean {stats['mean']:.4f}, std {stats['std']:.4f} -> {path}", flush=True)
    distributed.barrier()
    return stats
