"""What megatron-core's mixture-of-experts layers report during training.

Each MoE layer's router adds its load-balancing loss to the backward pass (scaled by
``model.moe_aux_loss_coeff`` and, through the pipeline schedule, by one over the
micro-batches, as the reward loss) and records its value, divided by the
coefficient, in megatron-core's layer-wise tracker. :func:`aux_loss_metrics` reads
that tracker once per optimizer step on every rank (it all-reduces over the
pipeline, tensor and data-parallel groups as megatron-core's own logging does) and
clears it for the next step.
"""

from __future__ import annotations

from megatron.core.transformer.moe.moe_utils import (
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
    reduce_aux_losses_tracker_across_ranks,
)

_TRACKED = "load_balancing_loss"


def aux_loss_metrics(num_microbatches: int, coeff: float) -> dict[str, float]:
    """This step's MoE metrics, the same on every rank; clears the tracker. Collective:
    every rank must call it. Empty when no layer recorded a loss (a dense trunk, a
    zero coefficient, or a forward-only step).

    ``moe_aux_loss``: the auxiliary loss added to the objective (the coefficient
    times the layers' summed load-balancing losses, averaged over the step's
    micro-batches and data-parallel ranks); ``moe_load_balance`` and
    ``moe_load_balance_max``: the load-balancing loss per layer, mean and worst
    layer (1 when every expert receives its share of tokens and probability, up to
    the number of experts when one expert takes all)."""
    tracker = get_moe_layer_wise_logging_tracker()
    if _TRACKED not in tracker:
        return {}
    reduce_aux_losses_tracker_across_ranks([_TRACKED])
    per_layer = tracker[_TRACKED]["values"].float() / num_microbatches
    clear_aux_losses_tracker()
    if not bool((per_layer != 0).any()):
        return {}
    return {
        "moe_aux_loss": coeff * float(per_layer.sum()),
        "moe_load_balance": float(per_layer.mean()),
        "moe_load_balance_max": float(per_layer.max()),
    }
