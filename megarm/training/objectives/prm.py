"""Process reward models (issue #29): a value head read at every step-end marker,
trained on per-step labels.

Data contract: ``logits`` ``[k]`` (the head's output at the ``k`` step markers of
a micro-batch, in sequence order), ``targets`` ``[k]`` (1.0 a good step, 0.0 a bad
one; soft labels anywhere in [0, 1]) and ``sequence`` ``[k]`` (which solution each
step belongs to; a solution's steps are consecutive).

Losses per step (``training.prm_loss``): ``bce``, binary cross-entropy of
``sigmoid(logit)`` against the label (soft labels allowed); ``mse``, the squared
error ``(sigmoid(logit) - label)^2`` (for soft labels such as Math-Shepherd's
completion rates). The step's probability of being correct is ``sigmoid(logit)``.
The training loss is the mean over every step of the global batch.

Metrics, from summed stats: ``step_accuracy`` (``sigmoid >= 0.5`` against
``label >= 0.5``), ``negative_f1`` (F1 of finding bad steps, the bad step the
positive class) and ``first_error_accuracy`` (solutions whose predicted first bad
step, or "none", is their labelled first bad step, or "none").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Summed over micro-batches and ranks.
STAT_KEYS = ("steps", "loss_sum", "correct", "neg_tp", "neg_fp", "neg_fn", "solutions",
             "first_error_correct")
LOSSES = ("bce", "mse")


def step_losses(logits: Tensor, targets: Tensor, loss: str = "bce") -> Tensor:
    """``[k]`` per-step losses in fp32 (module docstring)."""
    x, y = logits.float(), targets.float()
    if loss == "bce":
        return F.binary_cross_entropy_with_logits(x, y, reduction="none")
    if loss == "mse":
        return (torch.sigmoid(x) - y) ** 2
    raise ValueError(f"training.prm_loss {loss!r}: choose from {LOSSES}")


def first_errors(bad: Tensor, sequence: Tensor, solutions: int) -> Tensor:
    """``[solutions]`` index (within its solution) of each solution's first bad step,
    or -1 when it has none."""
    start = torch.zeros(solutions, dtype=torch.long, device=bad.device)
    counts = torch.bincount(sequence, minlength=solutions)
    start[1:] = torch.cumsum(counts, 0)[:-1]
    within = torch.arange(bad.shape[0], device=bad.device) - start[sequence]
    big = torch.full_like(within, torch.iinfo(torch.long).max)
    first = torch.full((solutions,), torch.iinfo(torch.long).max, dtype=torch.long,
                       device=bad.device)
    first = first.scatter_reduce(0, sequence, torch.where(bad, within, big), "amin")
    return torch.where(first == torch.iinfo(torch.long).max, -1, first)


def step_stats(logits: Tensor, targets: Tensor, sequence: Tensor, solutions: int,
               losses: Tensor) -> Tensor:
    """``[len(STAT_KEYS)]`` float64 sums of one micro-batch (detached)."""
    predicted_bad = logits.detach().float() < 0.0  # sigmoid < 0.5
    bad = targets < 0.5
    first_true = first_errors(bad, sequence, solutions)
    first_pred = first_errors(predicted_bad, sequence, solutions)
    d = torch.float64
    return torch.stack([
        torch.tensor(float(targets.shape[0]), dtype=d, device=logits.device),
        losses.detach().double().sum(),
        (predicted_bad == bad).double().sum(),
        (predicted_bad & bad).double().sum(),
        (predicted_bad & ~bad).double().sum(),
        (~predicted_bad & bad).double().sum(),
        torch.tensor(float(solutions), dtype=d, device=logits.device),
        (first_true == first_pred).double().sum(),
    ])


def step_metrics(s: dict[str, float]) -> dict[str, float]:
    """Metrics from the summed stats (keys ``prm_<STAT_KEYS>``)."""
    steps = max(s["prm_steps"], 1.0)
    tp, fp, fn = s["prm_neg_tp"], s["prm_neg_fp"], s["prm_neg_fn"]
    return {
        "loss": s["prm_loss_sum"] / steps,
        "step_accuracy": s["prm_correct"] / steps,
        "accuracy": s["prm_correct"] / steps,
        "negative_f1": 2 * tp / max(2 * tp + fp + fn, 1.0),
        "first_error_accuracy": s["prm_first_error_correct"] / max(s["prm_solutions"], 1.0),
        "steps": s["prm_steps"],
        "solutions": s["prm_solutions"],
    }
