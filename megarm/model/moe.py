"""What megatron-core's mixture-of-experts layers report during training.

Each MoE layer's router adds its load-balancing loss (and, with
``model.moe_z_loss_coeff``, its z-loss) to the backward pass (scaled by its
coefficient and, through the pipeline schedule, by one over the micro-batches, as
the reward loss) and records its value, divided by the coefficient, in
megatron-core's layer-wise tracker. :func:`aux_loss_metrics` reads
that tracker once per optimizer step on every rank (it all-reduces over the
pipeline, tensor and data-parallel groups as megatron-core's own logging does) and
clears it for the next step.
"""

from __future__ import annotations

from typing import Any

from megatron.core.transformer.moe.moe_utils import (
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
    reduce_aux_losses_tracker_across_ranks,
)

_TRACKED = "load_balancing_loss"
_Z_LOSS = "z_loss"


def aux_loss_metrics(num_microbatches: int, model: Any) -> dict[str, float]:
    """This step's MoE metrics, the same on every rank; clears the tracker. Collective:
    every rank must call it. Empty when no layer recorded a loss (a dense trunk, a
    zero coefficient, or a forward-only step).

    ``moe_aux_loss``: the auxiliary loss added to the objective (the coefficient
    times the layers' summed load-balancing losses, averaged over the step's
    micro-batches and data-parallel ranks); ``moe_load_balance`` and
    ``moe_load_balance_max``: the load-balancing loss per layer, mean and worst
    layer (1 when every expert receives its share of tokens and probability, up to
    the number of experts when one expert takes all); ``moe_z_loss``, with
    ``model.moe_z_loss_coeff``: the z-loss added (the coefficient times the layers'
    summed mean squared log-sum-exp of the router logits). ``model``: the
    ModelConfig."""
    tracker = get_moe_layer_wise_logging_tracker()
    names = [n for n in (_TRACKED, _Z_LOSS) if n in tracker]
    if not names:
        return {}
    reduce_aux_losses_tracker_across_ranks(names)
    per_layer = {n: tracker[n]["values"].float() / num_microbatches for n in names}
    clear_aux_losses_tracker()
    out: dict[str, float] = {}
    balance = per_layer.get(_TRACKED)
    if balance is not None and bool((balance != 0).any()):
        out.update(
            moe_aux_loss=model.moe_aux_loss_coeff * float(balance.sum()),
            moe_load_balance=float(balance.mean()),
            moe_load_balance_max=float(balance.max()),
        )
    z = per_layer.get(_Z_LOSS)
    if z is not None and bool((z != 0).any()):
        out["moe_z_loss"] = model.moe_z_loss_coeff * float(z.sum())
    return out
