"""The optimizer and learning-rate schedule of a run, megatron-core's: Adam (fused
where TE/apex provide it, torch's fused AdamW otherwise where torch has the kernel:
:func:`megarm.platform.apply_adam_kernel`), the distributed optimizer when
``parallel.use_distributed_optimizer``, fp32 main weights under bf16, and
Megatron-LM's ``OptimizerParamScheduler`` (linear warm-up, then the decay style)."""

from __future__ import annotations

# Before megatron-core is first imported: it warns at import about absent optional kernels.
from megarm import platform  # noqa: F401

# isort: split
import math

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megarm.config import MegarmConfig
from megarm.model.builder import params_dtype


def build_optimizer(
    cfg: MegarmConfig, model: list[torch.nn.Module]
) -> tuple[object, OptimizerParamScheduler]:
    """The optimizer over the DDP-wrapped ``model`` chunks, and its LR schedule."""
    o, t = cfg.optimizer, cfg.training
    dtype = params_dtype(cfg)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=o.lr,
            min_lr=o.min_lr,
            weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2,
            adam_eps=o.adam_eps,
            clip_grad=o.clip_grad,
            bf16=dtype == torch.bfloat16,
            params_dtype=dtype,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        ),
        model,
    )
    platform.apply_adam_kernel(optimizer)
    warmup = int(o.lr_warmup_fraction * t.train_iters)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(t.train_iters, warmup + 1),
        lr_decay_style=o.lr_decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=t.train_iters,
        wd_incr_style="constant",
    )
    return optimizer, scheduler


class NonFiniteGradError(RuntimeError):
    """The gradient norm became NaN or inf; training stopped before the update."""


def step_optimizer(optimizer: object, iteration: int) -> float | None:
    """One optimizer step that refuses a non-finite gradient: megatron-core's
    ``ChainedOptimizer.step`` in its public pieces (prepare the main grads, the
    global grad norm, clip by it, update), with a check between norm and update.

    The norm is the one megatron-core computes for clipping and logging anyway (over
    every main gradient, each counted once: TP duplicates and shared embeddings
    excluded, reduced over the model- and data-parallel ranks), so a NaN or inf in
    any gradient on any rank stops every rank before any weight changes, in place of
    the DDP's norm over each whole gradient buffer. Returns the grad norm; ``None``
    when an fp16 loss scale overflowed (the step is skipped, as megatron-core does).
    """
    if optimizer.prepare_grads():
        return None
    grad_norm = float(optimizer.get_grad_norm())
    if not math.isfinite(grad_norm):
        raise NonFiniteGradError(
            f"grad norm is {grad_norm} at iteration {iteration}; stopped before the "
            "optimizer step (the last saved checkpoint is kept)"
        )
    for inner in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        if getattr(inner, "is_stub_optimizer", False) or inner.config.clip_grad <= 0.0:
            continue
        params = inner.get_parameters()
        if params:
            clip_grad_by_total_norm_fp32(
                params, max_norm=inner.config.clip_grad, total_norm=grad_norm,
                use_decoupled_grad=inner.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
            )
    optimizer.step_with_ready_grads()
    return grad_norm
