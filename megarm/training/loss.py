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
from megarm.training.objectives import listwise, prm, regression

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
    # training.objective listwise: megarm.training.objectives.listwise.STAT_KEYS.
    *(f"list_{key}" for key in listwise.STAT_KEYS),
    # training.objective prm: megarm.training.objectives.prm.STAT_KEYS.
    *(f"prm_{key}" for key in prm.STAT_KEYS),
)


def pairwise_loss(rewards: Tensor, margin: Tensor) -> tuple[Tensor, Tensor]:
    """Per-pair Bradley-Terry loss and reward gap from ``[2b]`` rewards (in fp32)."""
    chosen, rejected = rewards.float().chunk(2)
    gap = chosen - rejected
    return -F.logsigmoid(gap - margin.float()), gap


def per_record(rewards: Tensor, valid: Tensor) -> Tensor:
    """``[n, K]`` rewards of ``n`` ranked records from the ``[rows]`` rewards (records
    one after another, :func:`megarm.data.dataset.sample_rows`); 0 at padded slots.
    Differentiable in ``rewards``."""
    return rewards.new_zeros(valid.shape).masked_scatter(valid, rewards)


def listwise_center(rewards: Tensor, valid: Tensor) -> Tensor:
    """``[n]`` centring terms of ranked records: ``(2 * mean_i r_i)^2`` over each
    record's responses, which for ``K = 2`` is TRL's ``(r_chosen + r_rejected)^2``."""
    return (2 * (rewards * valid).sum(-1) / valid.sum(-1)) ** 2


def _fill(value: float, device: torch.device) -> Tensor:
    # A fill on the device; torch.tensor(n, device=cuda) would be a blocking copy.
    return torch.full((), value, dtype=torch.float64, device=device)


def loss_func(
    batch: PairBatch,
    output: Tensor | tuple[Tensor | None, Tensor],
    rm_weight: float = 1.0,
    lm_weight: float = 0.0,
    center_coef: float = 0.0,
    label_weights: Tensor | None = None,
    listwise_loss: str = "plackett_luce",
    consistency_coef: float = 0.0,
    prm_loss: str = "bce",
) -> tuple[Tensor, dict[str, Tensor]]:
    """The micro-batch's loss and sums for the step's metrics.

    ``output`` is the model's: ``[2b]`` rewards, or ``(rewards or None, [m]
    per-token cross-entropy)`` when the batch asks for an LM loss. The loss is
    ``rm_weight * mean pairwise loss + lm_weight * lm_scale * cross-entropy sum``
    (each term only where its head ran); see the module docstring for why the LM
    term is a scaled sum. ``center_coef`` (``training.center_rewards_coefficient``)
    adds ``center_coef * mean((r_chosen + r_rejected)^2)`` to the pairwise loss
    (TRL's definition), inside ``rm_weight``.

    A list-wise batch (``scores``) takes the mean Plackett-Luce loss over its
    records (``listwise_loss="all_pairs"``: each record's mean Bradley-Terry loss
    over its score-distinct pairs); a regression batch (``targets``) the ``label_weights``-weighted squared
    error sum over its labelled entries times ``target_scale`` (the loop sets it so
    the step's gradient is that of the global batch's weighted mean; unset, the
    micro-batch's own mean), its per-attribute sums in ``out["regression"]``.

    A step-labelled batch (``step_targets``; the rewards are one per step marker)
    takes ``prm_loss`` per step (:mod:`megarm.training.objectives.prm`), its sum times
    ``step_scale`` (the loop sets it so the step's gradient is that of the mean over
    the global batch's steps; unset, the micro-batch's own mean).

    With ``training.reward_offsets`` the
    rewards hold ``[2b]`` more per extra position: the pairwise loss is the mean of
    each position's, plus ``consistency_coef * mean((r_k - r)^2)``
    (``training.reward_consistency_coefficient``); the stats are the trained position's.
    """
    rewards, lm_losses = output if isinstance(output, tuple) else (output, None)
    device = (rewards if rewards is not None else lm_losses).device  # type: ignore[union-attr]
    zero = _fill(0.0, device)
    terms: list[Tensor] = []
    step_rewards, prm_stats = None, [zero] * len(prm.STAT_KEYS)
    if rewards is not None and batch.step_targets is not None:  # one reward per step
        step_rewards, rewards = rewards, None
        losses = prm.step_losses(step_rewards, batch.step_targets, prm_loss)
        scale = batch.step_scale or 1.0 / max(batch.num_steps, 1)
        terms.append(rm_weight * scale * losses.sum())
        prm_stats = list(prm.step_stats(step_rewards, batch.step_targets, batch.step_sequence,
                                        batch.num_sequences, losses).unbind())
    # training.reward_offsets: the [2b] trained rewards, then [2b] per offset position.
    sequences = 2 * batch.num_pairs or batch.num_sequences
    others = rewards[sequences:] if rewards is not None else None
    if rewards is not None:
        rewards = rewards[:sequences]
    # Sums in float64: token counts squared pass fp32's exact integers (2^24) quickly.
    lengths = batch.sequence_lengths()[:sequences].double()
    center_sq = zero
    list_stats = [zero] * len(listwise.STAT_KEYS)
    if rewards is not None and batch.scores is not None:  # list-wise: no pairs
        valid = batch.valid.bool()
        ranked = per_record(rewards.float(), valid)
        rm_loss = listwise.LOSSES[listwise_loss](ranked, batch.scores, valid).mean()
        centre = listwise_center(ranked, valid)
        center_sq = centre.detach().double().sum()
        if center_coef:
            rm_loss = rm_loss + center_coef * centre.mean()
        terms.append(rm_weight * rm_loss)
        list_stats = list(listwise.ranking_stats(ranked, batch.scores, valid, listwise_loss).unbind())
    out: dict[str, Tensor] = {}
    if rewards is not None and batch.targets is not None:
        mask = batch.target_mask.bool()
        predictions = rewards.float().reshape(batch.targets.shape)
        weights = (torch.ones(mask.shape[-1], device=device) if label_weights is None
                   else label_weights.to(device=device, dtype=torch.float32))
        sse = (((predictions - batch.targets.float()) ** 2) * mask).sum(0)
        scale = batch.target_scale or 1.0 / max(float((weights * mask.sum(0)).sum()), 1.0)
        terms.append(rm_weight * scale * (weights * sse).sum())
        out["regression"] = regression.regression_stats(predictions, batch.targets, mask)
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
            *list_stats,
            *prm_stats,
        ]
    )
    if batch.context_rank:
        # Every CP rank has the same rewards: pair and sequence sums count on CP rank 0;
        # the LM sums are each rank's own positions and add up over CP.
        keep = torch.zeros(len(STAT_KEYS), dtype=stats.dtype, device=device)
        keep[[STAT_KEYS.index("lm_loss_sum"), STAT_KEYS.index("lm_tokens")]] = 1.0
        stats = stats * keep
    out["stats"] = stats
    if rewards is not None or step_rewards is not None:
        out["rewards"] = (rewards if rewards is not None else step_rewards).detach()
    return sum(terms[1:], terms[0]), out


def loss_weights(cfg) -> tuple[float, float]:  # noqa: ANN001 - a megarm.config.MegarmConfig
    """``(rm_weight, lm_weight)`` of ``training.objective``."""
    t = cfg.training
    return {"rm": (1.0, 0.0), "sft": (0.0, 1.0), "listwise": (1.0, 0.0), "regression": (1.0, 0.0),
            "prm": (1.0, 0.0)}.get(
        t.objective, (t.rm_loss_weight, t.lm_loss_weight)
    )


def reduce_stats(
    outputs: list[dict[str, Tensor]],
    contribute: bool = True,
    weights: tuple[float, float] = (1.0, 0.0),
    center_coef: float = 0.0,
    objective: str = "rm",
    label_names: list[str] | None = None,
    label_weights: list[float] | None = None,
) -> dict[str, float]:
    """Sum the micro-batches' stats over all ranks and turn them into metrics.

    ``outputs`` is what the schedule returned on this rank. Exactly one TP rank per
    data-parallel replica and CP rank must ``contribute`` (TP rank 0 of the last
    pipeline stage; :func:`loss_func` keeps only the LM sums on CP ranks > 0); the
    others add zeros, so every rank ends with the same numbers. The
    sums leave the device in one copy, after the schedule, and are reduced on the
    host group (:func:`megarm.distributed.all_reduce_host`).

    ``weights`` (``(rm_weight, lm_weight)``, :func:`loss_weights`) make ``loss`` the
    objective's loss; with an LM term the metrics add ``rm_loss`` (pairs only),
    ``lm_loss`` (mean over the global batch's supervised tokens), ``lm_tokens`` and
    ``perplexity``. With ``center_coef`` (``training.center_rewards_coefficient``)
    the pairwise ``loss`` includes ``center_coef * mean((r_chosen + r_rejected)^2)``,
    logged alone as ``center_loss``, the Bradley-Terry part as ``bt_loss``.

    ``objective="listwise"``: ``loss`` is the mean Plackett-Luce loss per record
    (plus ``center_coef`` times the mean of :func:`listwise_center`, logged as
    ``center_loss``, the ranking part as ``pl_loss``), with ``top1_accuracy``,
    ``pairwise_accuracy`` (also as ``accuracy``), ``kendall_tau``, ``lists`` and
    ``ranked_pairs`` (score-distinct pairs compared).

    ``objective="prm"``: ``loss`` is the mean per-step loss over the global batch's
    steps, with ``step_accuracy`` (also as ``accuracy``), ``negative_f1``,
    ``first_error_accuracy``, ``steps`` and ``solutions``
    (:func:`megarm.training.objectives.prm.step_metrics`).

    ``objective="regression"`` (``label_names`` given): ``loss`` is
    ``sum_a w_a SSE_a / sum_a w_a N_a`` over the global batch (``label_weights``
    ``w``, 1 when ``None``), with ``mse``, ``rmse/<name>``, ``pearson/<name>`` and
    ``labelled/<name>`` (labels counted) per attribute; its sums take a second host
    all-reduce.
    """
    total = torch.zeros(len(STAT_KEYS), dtype=torch.float64)
    if contribute and outputs:
        total += torch.stack([out["stats"].detach() for out in outputs]).sum(0).cpu()
    s = dict(zip(STAT_KEYS, all_reduce_host(total).tolist(), strict=True))
    rm_weight, lm_weight = weights
    metrics: dict[str, float] = {}
    if objective == "regression":
        names = label_names or ["label_0"]
        summed = torch.zeros(len(regression.STAT_KEYS), len(names), dtype=torch.float64)
        if contribute and outputs:
            summed += torch.stack([out["regression"].detach() for out in outputs]).sum(0).cpu()
        summed = all_reduce_host(summed.flatten()).reshape(summed.shape)
        count, sse = summed[0], summed[1]
        w = torch.tensor(label_weights or [1.0] * len(names), dtype=torch.float64)
        metrics = {
            "loss": float((w * sse).sum() / max(float((w * count).sum()), 1.0)),
            "mse": float(sse.sum() / max(float(count.sum()), 1.0)),
            **regression.regression_metrics(summed, names),
            **{f"labelled/{name}": float(count[a]) for a, name in enumerate(names)},
        }
    elif objective == "prm":
        metrics = prm.step_metrics(s)
    elif objective == "listwise":
        ranked = listwise.ranking_metrics(
            torch.tensor([s[f"list_{key}"] for key in listwise.STAT_KEYS], dtype=torch.float64)
        )
        metrics = {
            "loss": ranked["loss"],
            "accuracy": ranked["pairwise_accuracy"],
            "top1_accuracy": ranked["top1_accuracy"],
            "pairwise_accuracy": ranked["pairwise_accuracy"],
            "kendall_tau": ranked["kendall_tau"],
            "lists": ranked["lists"],
            "ranked_pairs": ranked["pairs"],
        }
        if center_coef:
            center_loss = center_coef * s["center_sq"] / max(s["list_lists"], 1.0)
            metrics.update(pl_loss=metrics["loss"], center_loss=center_loss)
            metrics["loss"] += center_loss
    elif s["pairs"] or not lm_weight:
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
