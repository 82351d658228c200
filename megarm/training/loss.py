"""The training losses and their metrics, as megatron-core's schedules take them.

A micro-batch holds ``b`` preference pairs as ``2b`` rows: chosen rows first, then
rejected rows, so both go through the model in one forward (or, for
``training.objective: sft``, ``b`` SFT records as ``b`` rows). The loss of a pair
is ``-logsigmoid(r_chosen - r_rejected - margin)``; ``loss_func`` returns the mean
over the micro-batch. megatron-core's schedule divides by the number of
micro-batches and DDP averages over data-parallel ranks, so the gradient is
exactly that of the mean over the global batch (every micro-batch has the same
number of pairs).

The LM loss is the mean cross-entropy over the supervised tokens of the *global*
batch, whose micro-batches hold different numbers of them. The training loop
counts them on the host before the schedule (each micro-batch's count is known at
collate time; one host all-reduce adds the data-parallel ranks' counts) and sets
every micro-batch's ``lm_scale = num_microbatches * dp_size / global_tokens``:
``loss_func`` returns the micro-batch's cross-entropy *sum* times that scale, and
the schedule's ``1 / num_microbatches`` and DDP's ``1 / dp_size`` turn the total
into exactly ``sum / global_tokens``. The joint loss is
``rm_weight * BT + lm_weight * LM`` of those two means.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from megarm.distributed import all_reduce_host
from megarm.model.step import PairBatch

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
    "lm_loss_sum",
    "lm_tokens",
    "sequences",
    "center_sq",
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


def _fill(value: float, device: torch.device) -> Tensor:
    # A fill on the device; torch.tensor(n, device=cuda) would be a blocking copy.
    return torch.full((), value, dtype=torch.float64, device=device)


def loss_func(
    batch: PairBatch,
    output: Tensor | tuple[Tensor | None, Tensor],
    rm_weight: float = 1.0,
    lm_weight: float = 0.0,
    center_coef: float = 0.0,
    consistency_coef: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The micro-batch's loss and sums for the step's metrics.

    ``output`` is the model's: ``[2b]`` rewards, or ``(rewards or None, [m]
    per-token cross-entropy)`` when the batch asks for an LM loss. The loss is
    ``rm_weight * mean pairwise loss + lm_weight * lm_scale * cross-entropy sum``
    (each term only where its head ran); see the module docstring for why the LM
    term is a scaled sum. ``center_coef`` (``training.center_rewards_coefficient``)
    adds ``center_coef * mean((r_chosen + r_rejected)^2)`` to the pairwise loss
    (TRL's definition), inside ``rm_weight``. With ``training.reward_offsets`` the
    rewards hold ``[2b]`` more per extra position: the pairwise loss is the mean of
    each position's, plus ``consistency_coef * mean((r_k - r)^2)``
    (``training.reward_consistency_coefficient``); the stats are the trained position's.
    """
    rewards, lm_losses = output if isinstance(output, tuple) else (output, None)
    device = (rewards if rewards is not None else lm_losses).device  # type: ignore[union-attr]
    # training.reward_offsets: the [2b] trained rewards, then [2b] per offset position.
    sequences = 2 * batch.num_pairs or batch.num_sequences
    others = rewards[sequences:] if rewards is not None else None
    if rewards is not None:
        rewards = rewards[:sequences]
    # Sums in float64: token counts squared pass fp32's exact integers (2^24) quickly.
    lengths = sequence_lengths(batch)[:sequences].double()
    zero = _fill(0.0, device)
    terms: list[Tensor] = []
    center_sq = zero
    if rewards is not None and batch.num_pairs:
        losses, gap = pairwise_loss(rewards, batch.margin)
        chosen, rejected = rewards.detach().double().chunk(2)
        center_sq = ((chosen + rejected) ** 2).sum()
        pair_stats = [
            losses.detach().double().sum(),
            (gap.detach() > 0).double().sum(),
            _fill(float(batch.num_pairs), device),
            chosen.sum(),
            (chosen * chosen).sum(),
            rejected.sum(),
            (rejected * rejected).sum(),
            gap.detach().double().sum(),
        ]
        rm_loss = losses.mean()
        if others is not None and others.numel():
            # A Bradley-Terry loss at each position a tool may read; their mean.
            extra = [pairwise_loss(r, batch.margin)[0].mean() for r in others.split(sequences)]
            rm_loss = (rm_loss + sum(extra)) / (1 + len(extra))
            if consistency_coef:
                trained = rewards.float().repeat(len(extra))
                rm_loss = rm_loss + consistency_coef * ((others.float() - trained) ** 2).mean()
        if center_coef:
            rows = rewards.float().chunk(2)
            rm_loss = rm_loss + center_coef * ((rows[0] + rows[1]) ** 2).mean()
        terms.append(rm_weight * rm_loss)
    else:
        pair_stats = [zero] * 8
    lm_stats = [zero, zero]
    if lm_losses is not None:
        lm_sum = lm_losses.sum()
        terms.append(lm_weight * batch.lm_scale * lm_sum)
        lm_stats = [lm_sum.detach().double(), _fill(float(batch.lm_tokens), device)]
    stats = torch.stack(
        [
            *pair_stats,
            lengths.sum(),
            (lengths**2).sum(),
            *lm_stats,
            _fill(float(sequences), device),
            center_sq,
        ]
    )
    out = {"stats": stats}
    if rewards is not None:
        out["rewards"] = rewards.detach()
    return sum(terms[1:], terms[0]), out


def loss_weights(cfg) -> tuple[float, float]:  # noqa: ANN001 - a megarm.config.MegarmConfig
    """``(rm_weight, lm_weight)`` of ``training.objective``."""
    t = cfg.training
    return {"rm": (1.0, 0.0), "sft": (0.0, 1.0)}.get(
        t.objective, (t.rm_loss_weight, t.lm_loss_weight)
    )


def reduce_stats(
    outputs: list[dict[str, Tensor]],
    contribute: bool = True,
    weights: tuple[float, float] = (1.0, 0.0),
    center_coef: float = 0.0,
) -> dict[str, float]:
    """Sum the micro-batches' stats over all ranks and turn them into metrics.

    ``outputs`` is what the schedule returned on this rank. Exactly one rank per
    data-parallel replica must ``contribute`` (TP rank 0 of the last pipeline
    stage); the others add zeros, so every rank ends with the same numbers. The
    sums leave the device in one copy, after the schedule, and are reduced on the
    host group (:func:`megarm.distributed.all_reduce_host`).

    ``weights`` (``(rm_weight, lm_weight)``, :func:`loss_weights`) make ``loss`` the
    objective's loss; with an LM term the metrics add ``rm_loss`` (pairs only),
    ``lm_loss`` (mean over the global batch's supervised tokens), ``lm_tokens`` and
    ``perplexity``. With ``center_coef`` (``training.center_rewards_coefficient``)
    the pairwise ``loss`` includes ``center_coef * mean((r_chosen + r_rejected)^2)``,
    logged alone as ``center_loss``, the Bradley-Terry part as ``bt_loss``.
    """
    total = torch.zeros(len(STAT_KEYS), dtype=torch.float64)
    if contribute and outputs:
        total += torch.stack([out["stats"].detach() for out in outputs]).sum(0).cpu()
    s = dict(zip(STAT_KEYS, all_reduce_host(total).tolist(), strict=True))
    rm_weight, lm_weight = weights
    metrics: dict[str, float] = {}
    if s["pairs"] or not lm_weight:
        n = max(s["pairs"], 1.0)
        chosen_mean, rejected_mean = s["chosen_sum"] / n, s["rejected_sum"] / n
        metrics = {
            "loss": s["loss_sum"] / n,
            "accuracy": s["correct"] / n,
            "chosen_reward": chosen_mean,
            "chosen_reward_std": max(s["chosen_sq"] / n - chosen_mean**2, 0.0) ** 0.5,
            "rejected_reward": rejected_mean,
            "rejected_reward_std": max(s["rejected_sq"] / n - rejected_mean**2, 0.0) ** 0.5,
            "reward_gap": s["gap_sum"] / n,
        }
        if center_coef:
            center_loss = center_coef * s["center_sq"] / n
            metrics.update(bt_loss=metrics["loss"], center_loss=center_loss)
            metrics["loss"] += center_loss
    metrics.update(pairs=s["pairs"], tokens=s["tokens"], tokens_sq=s["tokens_sq"])
    metrics["sequences"] = s["sequences"]
    if lm_weight:
        lm_loss = s["lm_loss_sum"] / max(s["lm_tokens"], 1.0)
        rm_loss = metrics.get("loss", 0.0)
        if s["pairs"]:
            metrics["rm_loss"] = rm_loss
        metrics.update(
            loss=rm_weight * rm_loss + lm_weight * lm_loss,
            lm_loss=lm_loss,
            lm_tokens=s["lm_tokens"],
            perplexity=math.exp(min(lm_loss, 700.0)),
        )
    return metrics
