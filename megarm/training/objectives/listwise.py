"""List-wise ranking: the Plackett-Luce loss over K responses to one prompt.

Data contract: a micro-batch holds ``n`` ranked records of up to ``K`` responses;
the model's rewards come as ``[n, K]`` with the records' ``scores`` ``[n, K]`` and
a ``valid`` mask ``[n, K]`` (records with fewer than ``K`` responses are padded;
padded slots are ignored). A record's responses stay in one micro-batch, so each
response goes through the model once (the pairwise split of K responses into
``K(K-1)/2`` pairs would run each one ``K-1`` times).

Loss of a record: responses in descending order of score, the negative
log-likelihood of that order under Plackett-Luce,
``-sum_i [r_i - logsumexp_{j in R_i} r_j]``. Ties (equal scores) follow
Breslow's rule: every response of a tied group is placed against the same risk
set ``R_i = {j : s_j <= s_i}`` (its group and everything ranked below), and a
group with nothing ranked below it (the last group, or a record whose scores are
all equal) adds no term. For ``K = 2`` with distinct scores this is exactly the
Bradley-Terry loss ``-logsigmoid(r_chosen - r_rejected)``. The micro-batch's loss
is the mean over records of their (summed, not per-term averaged) loss.

Metrics, from summed stats (so they reduce over ranks and micro-batches):
``top1_accuracy`` (the highest reward is on a response of the highest score),
``pairwise_accuracy`` (over all pairs of distinct score, the better one has the
higher reward), ``kendall_tau`` (pooled ``(concordant - discordant) / pairs``
over the same pairs: Kendall's tau-a on score-distinct pairs, a reward tie counts
as neither).
"""

from __future__ import annotations

import torch
from torch import Tensor

STAT_KEYS = ("loss_sum", "lists", "top1_correct", "pairs", "concordant", "discordant")


def plackett_luce_loss(rewards: Tensor, scores: Tensor, valid: Tensor | None = None) -> Tensor:
    """``[n]`` Plackett-Luce negative log-likelihoods (fp32) of the score order,
    ties by Breslow's rule (module docstring)."""
    r = rewards if rewards.dtype == torch.float64 else rewards.float()
    s = scores.to(r.dtype)
    valid = torch.ones_like(s, dtype=torch.bool) if valid is None else valid.bool()
    # risk[n, i, j]: j is in i's risk set (valid and not ranked above i). i itself
    # always is, so no row is all -inf (its logsumexp gradient would be NaN).
    eye = torch.eye(s.shape[-1], dtype=torch.bool, device=s.device)
    risk = (valid[:, None, :] & (s[:, None, :] <= s[:, :, None])) | eye
    below = valid[:, None, :] & (s[:, None, :] < s[:, :, None])
    counts = valid & below.any(-1)  # i has something strictly below it
    masked = r[:, None, :].masked_fill(~risk, float("-inf"))
    lse = torch.logsumexp(masked, dim=-1)
    terms = torch.where(counts, lse - r, torch.zeros_like(r))
    return terms.sum(-1)


def all_pairs_loss(rewards: Tensor, scores: Tensor, valid: Tensor | None = None) -> Tensor:
    """``[n]`` per-record mean Bradley-Terry loss over every score-distinct pair (the
    better response as chosen); 0 for a record without such a pair. K=2 is
    Bradley-Terry. ``training.listwise_loss: all_pairs``."""
    r = rewards if rewards.dtype == torch.float64 else rewards.float()
    s = scores.to(r.dtype)
    valid = torch.ones_like(s, dtype=torch.bool) if valid is None else valid.bool()
    ordered = valid[:, :, None] & valid[:, None, :] & (s[:, :, None] > s[:, None, :])
    gap = r[:, :, None] - r[:, None, :]
    losses = torch.where(ordered, -torch.nn.functional.logsigmoid(gap), torch.zeros_like(gap))
    return losses.sum((1, 2)) / ordered.sum((1, 2)).clamp_min(1)


LOSSES = {"plackett_luce": plackett_luce_loss, "all_pairs": all_pairs_loss}


def ranking_stats(
    rewards: Tensor, scores: Tensor, valid: Tensor | None = None, loss: str = "plackett_luce"
) -> Tensor:
    """Float64 sums in :data:`STAT_KEYS` order for one micro-batch (no gradient);
    ``loss_sum`` of the ``loss`` in :data:`LOSSES`."""
    r = rewards.detach().double()
    s = scores.detach().double()
    valid = torch.ones_like(s, dtype=torch.bool) if valid is None else valid.bool()
    loss_values = LOSSES[loss](r, s, valid).double()
    neg = float("-inf")
    top = r.masked_fill(~valid, neg).argmax(-1)
    best = s.masked_fill(~valid, neg).amax(-1)
    top1 = (s.gather(-1, top[:, None])[:, 0] == best).double()
    both = valid[:, :, None] & valid[:, None, :]
    ordered = both & (s[:, :, None] > s[:, None, :])  # i strictly better than j
    dr = r[:, :, None] - r[:, None, :]
    return torch.stack([
        loss_values.sum(),
        torch.tensor(float(r.shape[0]), dtype=torch.float64, device=r.device),
        top1.sum(),
        ordered.double().sum(),
        (ordered & (dr > 0)).double().sum(),
        (ordered & (dr < 0)).double().sum(),
    ])


def ranking_metrics(stats: Tensor) -> dict[str, float]:
    """Metrics from summed :func:`ranking_stats` (over micro-batches and ranks)."""
    s = dict(zip(STAT_KEYS, stats.tolist(), strict=True))
    lists, pairs = max(s["lists"], 1.0), max(s["pairs"], 1.0)
    return {
        "loss": s["loss_sum"] / lists,
        "top1_accuracy": s["top1_correct"] / lists,
        "pairwise_accuracy": s["concordant"] / pairs,
        "kendall_tau": (s["concordant"] - s["discordant"]) / pairs,
        "lists": s["lists"],
        "pairs": s["pairs"],
    }
