"""The optimizer's kernels on this device: which Adam megatron-core's optimizer runs,
and the grad-norm / clip kernels its ``clip_grads`` module calls.

Without transformer-engine or apex (every CPU machine, CUDA machines without them)
megatron-core 0.16 builds ``torch.optim.AdamW(..., foreach=None, fused=None)``:
on CPU torch then runs its single-tensor loop, whose out-of-place ``sqrt`` and
``div`` make a new temporary the size of every parameter each step (the 151,936-row
embedding included); on CUDA its foreach path, with the same temporaries per list.
torch's fused AdamW (``fused=True``, CPU and CUDA) updates in place in one pass.
:func:`apply_adam_kernel` switches the optimizer megatron-core built to it; the
result equals the single-tensor update up to rounding (the fused kernel orders the
same fp32 operations differently: at most an ulp or two per element per step).

The same fallback gives ``clip_grads`` megatron-core's local multi-tensor helpers:
the L2 norm takes ``torch.norm`` of each tensor and builds a host tensor from the
list (one device-to-host sync per parameter on CUDA), and the clip writes
``dst.copy_(src * scale)``, a temporary the size of every gradient.
:func:`install_multi_tensor_grads` replaces both with ``torch._foreach_norm`` (one
norm of the per-tensor norms, on the device; no sync until megatron-core reads the
reduced total) and an in-place ``torch._foreach_mul_``. On CPU both are bitwise
equal to the helpers they replace (the same per-tensor reductions and the same fp32
multiply); on CUDA the foreach norm sums in another order (rounding only).
"""

from __future__ import annotations

from typing import Any

import torch

_FUSED_DEVICES_FALLBACK = ("cpu", "cuda")


def torch_fused_adam_supported(device_type: str) -> bool:
    """torch has a fused Adam kernel for ``device_type`` (``cpu``, ``cuda``, ...)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # a torch without the helper: the devices fused Adam had from 2.4
        return device_type in _FUSED_DEVICES_FALLBACK
    return device_type in _get_fused_kernels_supported_devices()


def _torch_adams(optimizer: Any) -> list[torch.optim.Optimizer]:
    """The torch Adam/AdamW instances inside megatron-core's (chained) optimizer."""
    chain = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    inner = [getattr(o, "optimizer", None) for o in chain]
    return [o for o in inner if isinstance(o, torch.optim.Adam | torch.optim.AdamW)]


def apply_adam_kernel(optimizer: Any, fused: bool) -> int:
    """Make the torch Adams inside megatron-core's ``optimizer`` fused (``fused``) or
    torch's default choice (not fused); return how many were set. Idempotent.

    Called after the optimizer is built and again after a checkpoint is loaded: a
    loaded state dict brings its own param groups (whose ``fused`` flag was the
    saving run's) and its ``step`` tensors where that run kept them (fused keeps
    them on the parameter's device in fp32, the default path on the host)."""
    adams = _torch_adams(optimizer)
    for adam in adams:
        adam.defaults["fused"] = fused or None
        for group in adam.param_groups:
            group["fused"] = fused or None
            group["foreach"] = False if fused else None
            if not fused:
                continue
            for param in group["params"]:
                step = adam.state.get(param, {}).get("step")
                if isinstance(step, torch.Tensor) and (
                    step.device != param.device or step.dtype != torch.float32
                ):
                    adam.state[param]["step"] = step.to(param.device, torch.float32)
    return len(adams)


# --------------------------------------------------------------------------- grad norm, clip


def foreach_l2_norm(chunk_size: int, noop_flag: torch.Tensor, tensor_lists: list,
                    per_tensor: bool, *args: Any) -> tuple[torch.Tensor, None]:
    """Drop-in for ``amp_C.multi_tensor_l2norm`` (as megatron-core calls it): the L2
    norm over every tensor of ``tensor_lists``, as a 1-element fp32 tensor on the
    tensors' device, without a host sync."""
    tensors = [t for tensor_list in tensor_lists for t in tensor_list]
    if not tensors:
        return torch.zeros(1, dtype=torch.float), None
    norms = torch._foreach_norm(tensors)
    total = torch.linalg.vector_norm(torch.stack(norms).float())
    return total.reshape(1), None


def foreach_scale(chunk_size: int, noop_flag: torch.Tensor, tensor_lists: list,
                  scale: float) -> None:
    """Drop-in for ``amp_C.multi_tensor_scale``: ``dst = src * scale``, in place when
    ``dst`` is ``src`` (megatron-core's clip passes the grads twice)."""
    src, dst = tensor_lists[0], tensor_lists[1]
    if not src:
        return
    if all(s is d for s, d in zip(src, dst, strict=True)):
        torch._foreach_mul_(dst, scale)
        return
    torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def install_multi_tensor_grads() -> bool:
    """Give megatron-core's ``clip_grads`` the foreach norm and in-place scale when it
    fell back to its local helpers (no TE/apex); True when installed."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads

    if clip_grads.l2_norm_impl is foreach_l2_norm:
        return True
    if clip_grads.l2_norm_impl is not utils.local_multi_tensor_l2_norm:
        return False  # transformer-engine's or apex's kernels: already multi-tensor
    clip_grads.l2_norm_impl = foreach_l2_norm
    clip_grads.multi_tensor_scale_impl = foreach_scale
    return True


def uninstall_multi_tensor_grads() -> None:
    """megatron-core's local helpers again (tests compare the two paths)."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads

    if clip_grads.l2_norm_impl is foreach_l2_norm:
        clip_grads.l2_norm_impl = utils.local_multi_tensor_l2_norm
        clip_grads.multi_tensor_scale_impl = utils.local_multi_tensor_scale
