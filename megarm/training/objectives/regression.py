"""Multi-attribute regression (SteerLM / HelpSteer2 style): a value head of
``num_labels`` outputs regressed on per-response attribute labels.

Data contract: ``predictions`` ``[n, L]`` (the head's outputs at each response's
reward token), ``labels`` ``[n, L]`` and ``mask`` ``[n, L]`` (False where a
record has no label for an attribute; those entries add nothing to the loss or
the metrics). ``weights`` ``[L]`` (per-attribute loss weights) default to 1.

Loss: ``sum_a w_a * SSE_a / sum_a w_a * N_a`` with ``SSE_a`` the squared error
of attribute ``a`` over its labelled entries and ``N_a`` their count, i.e. the
weighted mean squared error over every labelled entry (an attribute missing on
a record neither adds error nor counts). Metrics per attribute, from summed
stats: ``rmse/<name>`` and ``pearson/<name>``.

Not yet wired: no ``training.objective: regression``, ``model.num_labels`` or
data handler; this module is the loss and metrics only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Per attribute, summed over micro-batches and ranks.
STAT_KEYS = ("count", "sse", "pred_sum", "label_sum", "pred_sq", "label_sq", "cross")


def masked_mse(
    predictions: Tensor, labels: Tensor, mask: Tensor, weights: Tensor | None = None
) -> Tensor:
    """The weighted mean squared error over the labelled entries (module docstring);
    0 (with a gradient) when nothing is labelled."""
    p = predictions.float()
    y = labels.to(p.dtype).masked_fill(~mask.bool(), 0.0)
    m = mask.to(p.dtype)
    w = torch.ones(p.shape[-1], dtype=p.dtype, device=p.device) if weights is None else weights.to(p)
    sse = (((p - y) ** 2) * m).sum(0)
    return (w * sse).sum() / (w * m.sum(0)).sum().clamp_min(1.0)


def regression_stats(predictions: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """``[len(STAT_KEYS), L]`` float64 sums for one micro-batch (no gradient)."""
    p = predictions.detach().double()
    m = mask.bool()
    y = labels.detach().double().masked_fill(~m, 0.0)
    p = p.masked_fill(~m, 0.0)
    return torch.stack([
        m.double().sum(0), ((p - y) ** 2).sum(0), p.sum(0), y.sum(0), (p * p).sum(0), (y * y).sum(0), (p * y).sum(0)
    ])


def regression_metrics(stats: Tensor, names: list[str]) -> dict[str, float]:
    """``rmse/<name>`` and ``pearson/<name>`` (NaN when undefined) from summed stats."""
    metrics: dict[str, float] = {}
    for a, name in enumerate(names):
        n, sse, sp, sy, spp, syy, spy = stats[:, a].tolist()
        metrics[f"rmse/{name}"] = math.sqrt(sse / n) if n else math.nan
        cov, vp, vy = n * spy - sp * sy, n * spp - sp * sp, n * syy - sy * sy
        metrics[f"pearson/{name}"] = cov / math.sqrt(vp * vy) if n and vp > 0 and vy > 0 else math.nan
    return metrics
