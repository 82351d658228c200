"""Device facts: the only place in megarm that knows about CPU versus CUDA.

Everything else asks this module for the device, the process-group backend, the
parameter dtype and the layer spec flavour, and calls :func:`activate` once per
process before touching megatron-core. On CUDA ``activate`` does nothing; without
CUDA it installs :mod:`megarm.platform.cpu_compat`, which lets megatron-core's
CUDA-only code paths run on CPU with gloo.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from functools import lru_cache

import torch

from megarm.platform import cpu_compat, mcore_fixes

__all__ = [
    "activate",
    "device",
    "dist_backend",
    "has_apex",
    "has_transformer_engine",
    "is_cuda",
    "max_memory_allocated",
    "set_local_device",
    "synchronize",
]


@lru_cache(maxsize=1)
def is_cuda() -> bool:
    """True when this process trains on CUDA GPUs.

    ``MEGARM_DEVICE=cpu`` forces the CPU path on a GPU machine (for debugging and
    for comparing against the fp32 CPU reference).
    """
    if os.environ.get("MEGARM_DEVICE", "").lower() == "cpu":
        return False
    return torch.cuda.is_available()


def device() -> torch.device:
    """The device this rank computes on."""
    if is_cuda():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def dist_backend() -> str:
    """torch.distributed backend: NCCL on CUDA, gloo on CPU."""
    return "nccl" if is_cuda() else "gloo"


def set_local_device(local_rank: int) -> None:
    """Bind this process to its GPU (no-op on CPU)."""
    if is_cuda():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())


@lru_cache(maxsize=1)
def has_transformer_engine() -> bool:
    """transformer-engine is importable *and* usable (it needs CUDA)."""
    if not is_cuda() or importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # a broken TE build must not stop training on the local spec
        return False
    return True


@lru_cache(maxsize=1)
def has_apex() -> bool:
    """apex is importable (used for fused kernels when the user built it)."""
    return is_cuda() and importlib.util.find_spec("apex") is not None


def synchronize() -> None:
    """Wait for queued device work (timings must include it on CUDA)."""
    if is_cuda():
        torch.cuda.synchronize()


def max_memory_allocated() -> int:
    """Peak bytes allocated on the device by this process (0 where unknown)."""
    if is_cuda():
        return int(torch.cuda.max_memory_allocated())
    return 0


# megatron-core warns at import about optional kernels; on a machine without them
# (every CPU machine) these are expected and would bury the training output.
_EXPECTED_WARNINGS = (
    r"Transformer Engine and Apex are not installed.*",
    r"Apex is not installed\. Falling back to Torch Norm",
    r"full scope is deprecated.*",
    r"When using async grad allreduce it is recommended.*",
    # megatron-core 0.16's dist_checkpointing still calls these torch APIs.
    r"`load_state_dict` is deprecated.*",
    r"Please use DTensor instead and we are deprecating ShardedTensor.*",
    r"`torch.distributed.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated.*",
)


def quiet_expected_warnings() -> None:
    """Silence megatron-core's warnings about optional fused kernels being absent."""
    for pattern in _EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def activate() -> None:
    """Prepare this process for megatron-core. Idempotent.

    On CPU this installs the compatibility layer; everywhere it quiets the
    warnings about optional kernels and, when apex / TE are absent, fixes the
    distributed optimizer's checkpoint loading (:mod:`megarm.platform.mcore_fixes`).
    """
    quiet_expected_warnings()
    if not is_cuda():
        cpu_compat.install()
    mcore_fixes.install()
