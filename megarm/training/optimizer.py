"""The optimizer and learning-rate schedule of a run, megatron-core's: Adam (fused
where TE/apex provide it, torch's otherwise), the distributed optimizer when
``parallel.use_distributed_optimizer``, fp32 main weights under bf16, and
Megatron-LM's ``OptimizerParamScheduler`` (linear warm-up, then the decay style)."""

from __future__ import annotations

# Before megatron-core is first imported: it warns at import about absent optional kernels.
from megarm import platform  # noqa: F401

# isort: split
import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
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
