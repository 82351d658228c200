"""Which fused kernel torch's scaled_dot_product_attention may use, chosen explicitly.

Left to itself, torch (2.5+) prefers cuDNN attention on Hopper with a recent cuDNN.
cuDNN builds one execution graph per input shape (tens of ms of host time each);
megarm's THD path calls SDPA once per packed segment, so a stream of hundreds of
distinct lengths would spend tens of seconds building graphs inside timed
iterations, and cuDNN attention has open "No execution plans support the graph"
failures. megarm therefore allows, in this order: flash, memory-efficient, math
(the flash kernel covers causal bf16/fp16 without a mask; memory-efficient takes
masks and fp32; math is the always-there fallback). ``MEGARM_SDPA_CUDNN=1`` puts
cuDNN first again, for measuring it. On CPU torch has flash (its CPU kernel) and
math only, and already prefers them in this order: the same list changes nothing there.

:class:`megarm.model.attention.SDPAttention` enters :func:`sdpa_context` once per
call (once per layer for a packed stream, not once per segment).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

CUDNN_OPT_IN = "MEGARM_SDPA_CUDNN"
"""Environment variable: ``1`` allows cuDNN attention, first (off by default)."""

_ORDER = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


def sdpa_backends(environ: Mapping[str, str] | None = None) -> list[SDPBackend]:
    """The SDPA backends megarm allows, highest priority first: flash,
    memory-efficient, math; cuDNN first only under ``MEGARM_SDPA_CUDNN=1``."""
    env = os.environ if environ is None else environ
    value = env.get(CUDNN_OPT_IN, "").strip().lower()
    if value not in ("", "0", "1", "false", "true"):
        raise ValueError(f"{CUDNN_OPT_IN}={value!r}: use 1 (allow cuDNN attention) or 0")
    cudnn = value in ("1", "true")
    return [SDPBackend.CUDNN_ATTENTION, *_ORDER] if cudnn else list(_ORDER)


# set_priority (torch 2.6+) makes the list an order, not only a set; without it the
# set alone still keeps cuDNN out, and torch's own order of the rest is the same.
_HAS_PRIORITY = "set_priority" in inspect.signature(sdpa_kernel).parameters


def sdpa_context(environ: Mapping[str, str] | None = None):
    """A context manager in which SDPA uses only :func:`sdpa_backends`, in that order."""
    backends = sdpa_backends(environ)
    if _HAS_PRIORITY:
        return sdpa_kernel(backends, set_priority=True)
    return sdpa_kernel(backends)


def chosen_backend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                   enable_gqa: bool = False, environ: Mapping[str, str] | None = None) -> str:
    """The backend SDPA picks for these ``[b, n, s, d]`` inputs inside
    :func:`sdpa_context` (torch's own dispatch, ``torch._fused_sdp_choice``), e.g.
    ``"FLASH_ATTENTION"``; ``"unknown"`` where this torch cannot say."""
    with sdpa_context(environ):
        try:
            index = torch._fused_sdp_choice(query, key, value, attn_mask, 0.0, is_causal,
                                            enable_gqa=enable_gqa)
        except (AttributeError, TypeError, RuntimeError):
            return "unknown"
    for backend in SDPBackend.__members__.values():
        if int(backend) == int(index):
            return backend.name
    return f"unknown ({index})"


def backend_report(device: torch.device, dtype: torch.dtype, heads: int = 14, groups: int = 2,
                   head_dim: int = 64, length: int = 170) -> dict[str, str]:
    """The chosen backend for a packed segment (causal, no mask: what the THD path
    sends per segment), a right-padded batch (causal, no mask) and a left-padded one
    (a boolean mask), at Qwen2.5-0.5B's attention shape by default."""
    q = torch.zeros(2, heads, length, head_dim, device=device, dtype=dtype)
    kv = torch.zeros(2, groups, length, head_dim, device=device, dtype=dtype)
    gqa = heads != groups
    mask = torch.ones(length, length, device=device, dtype=torch.bool).tril()[None, None]
    mask = mask.expand(2, 1, length, length).clone()
    mask[1, :, :, : length // 4] = False  # the second row left-padded
    return {
        "packed": chosen_backend(q[:1], kv[:1], kv[:1], None, True, gqa),
        "padded": chosen_backend(q, kv, kv, None, True, gqa),
        "padded_masked": chosen_backend(q, kv, kv, mask, False, gqa),
    }


# A causal mask whose queries are the end of a longer key sequence (context
# parallelism's chunks, lower-right aligned) has no fused CPU kernel: torch
# materialises it (query x key elements, as floats, plus its gradient's). CUDA's
# flash / memory-efficient kernels take the alignment as a flag and build nothing.
_CPU_MASK_ELEMENTS = 1 << 24


def max_mask_elements(device: torch.device) -> int | None:
    """Most query x key elements one lower-right causal SDPA call should cover on
    ``device`` (callers split the queries into blocks above it); ``None``: no limit."""
    return None if device.type == "cuda" else _CPU_MASK_ELEMENTS
