"""Let megatron-core's CUDA-only code run on CPU with gloo.

megatron-core assumes CUDA in a handful of ways, listed below. This module
neutralises each one, in one place, so the model, schedules, DDP, optimizer
and dist_checkpointing run unchanged on CPU:

* ``torch.cuda.current_device()`` returns the CPU device, and every ``device="cuda"`` /
  ``device=0`` / ``.cuda()`` / ``.to("cuda")`` is mapped to the CPU by a
  :class:`torch.overrides.TorchFunctionMode` (pinned memory is dropped too);
* the RNG tracker's CUDA state functions use the CPU generator;
* ``tensor.type()`` called from megatron-core reports ``torch.cuda.*`` names,
  because the optimizer and grad clipping assert on them;
* CUDA stream / synchronize / NVTX calls become no-ops.

Only :func:`install` changes anything, and only when CUDA is not in use.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_lock = threading.Lock()
_installed = False
_mode: _CudaToCpuMode | None = None


def _is_cuda_device(value: Any) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    if isinstance(value, str):
        return value == "cuda" or value.startswith("cuda:")
    # megatron passes torch.cuda.current_device() (an int) as a device.
    return isinstance(value, int) and not isinstance(value, bool)


def _map_device(value: Any) -> Any:
    return _CPU if _is_cuda_device(value) else value


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments of torch calls to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return _tensor_type_name(args[0])
        if "device" in kwargs:
            kwargs["device"] = _map_device(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


def _tensor_type_name(tensor: torch.Tensor) -> str:
    """``tensor.type()``, reported as a CUDA type to megatron-core's asserts."""
    with torch._C.DisableTorchFunction():
        name = tensor.type()
    caller = _caller_module()
    if caller.startswith("megatron.") and name.startswith("torch.") and ".cuda." not in name:
        return "torch.cuda." + name[len("torch."):]
    return name


def _caller_module() -> str:
    """The module that called ``tensor.type()``: the first frame above this module and
    any torch-function mode stacked over it (a test's, e.g.)."""
    frame = sys._getframe(2)
    while frame is not None and (
        frame.f_code.co_name == "__torch_function__" or frame.f_globals.get("__name__") == __name__
    ):
        frame = frame.f_back
    return frame.f_globals.get("__name__", "") if frame is not None else ""


def _cpu_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False):
    torch.set_rng_state(new_state)


class _NullStream:
    """Stand-in for ``torch.cuda.Stream`` on CPU: work is synchronous."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, other: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event: Any = None) -> _NullEvent:
        # megatron-core's MoE alltoall dispatcher synchronizes on the event it records.
        return _NullEvent()


class _NullEvent:
    """Stand-in for ``torch.cuda.Event`` on CPU: already complete."""

    def synchronize(self) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True


class _RngWarningFilter(logging.Filter):
    """On CPU the "CUDA" tracker state *is* the CPU generator, so megatron's
    warning that the CPU state changed inside a fork is expected noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    # The CPU device itself rather than 0: autograd runs backward functions
    # without the TorchFunctionMode, and megatron allocates there with
    # device=torch.cuda.current_device().
    cuda.current_device = lambda: _CPU
    cuda.get_rng_state = _cpu_get_rng_state
    cuda.set_rng_state = _cpu_set_rng_state
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU
    # generator directly to avoid recursion.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.synchronize = lambda device=None: None
    cuda.current_stream = lambda device=None: _NullStream()
    cuda.default_stream = lambda device=None: _NullStream()
    cuda.Stream = _NullStream
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.set_stream = lambda stream: None
    cuda.empty_cache = lambda: None
    cuda.nvtx.range_push = lambda msg: None
    cuda.nvtx.range_pop = lambda: None


def _splits_on_host(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
    """megatron-core's ``maybe_move_tensor_to_cpu`` for tensors already on the CPU:
    the MoE alltoall dispatcher asks for its split sizes as numpy arrays (on CUDA they
    come back from the device as such; a CPU tensor would be left a tensor, which
    ``all_to_all_single`` refuses as split sizes)."""
    del record_stream
    if as_numpy and torch.is_tensor(tensor):
        return tensor.numpy()
    return tensor


def _uneven_collectives(mappings: Any) -> None:
    """gloo's all-gather and reduce-scatter take equal chunks only; megatron-core's
    MoE dispatch with experts split by TP gathers and scatters tokens in uneven
    chunks (``output_split_sizes`` / ``input_split_sizes``). On CPU: the gather pads
    every chunk to the largest and trims; the reduce-scatter all-reduces the whole
    tensor and keeps this rank's chunk (the same sums)."""
    gather, scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def gather_uneven(input_, group, output_split_sizes=None, use_global_buffer=False):  # noqa: ANN001, ANN202
        if output_split_sizes is None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(n) for n in output_split_sizes]
        longest = max(sizes)
        padded = input_.new_zeros((longest, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        chunks = [torch.empty_like(padded) for _ in sizes]
        from megarm import distributed  # at call time: distributed imports platform

        distributed.all_gather_device(chunks, padded.contiguous(), group)
        return torch.cat([chunk[:n] for chunk, n in zip(chunks, sizes, strict=True)], dim=0)

    def scatter_uneven(input_, group, input_split_sizes=None, use_global_buffer=False):  # noqa: ANN001, ANN202
        if input_split_sizes is None or group.size() == 1:
            return scatter(input_, group, input_split_sizes, use_global_buffer)
        from megarm import distributed

        total = input_.clone()
        distributed.all_reduce_device(total, group)
        sizes = [int(n) for n in input_split_sizes]
        return torch.split(total, sizes, dim=0)[group.rank()].contiguous()

    mappings._gather_along_first_dim = gather_uneven
    mappings._reduce_scatter_along_first_dim = scatter_uneven


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import mappings
    from megatron.core.tensor_parallel import random as mcore_random
    from megatron.core.transformer.moe import token_dispatcher

    token_dispatcher.maybe_move_tensor_to_cpu = _splits_on_host
    _uneven_collectives(mappings)

    mcore_random._get_cuda_rng_state = _cpu_get_rng_state
    mcore_random._set_cuda_rng_state = _cpu_set_rng_state
    logging.getLogger(mcore_random.__name__).addFilter(_RngWarningFilter())


def install() -> None:
    """Install the layer in this process (idempotent, thread-safe)."""
    global _installed, _mode
    with _lock:
        if _installed:
            return
        _patch_torch_cuda()
        _patch_megatron()
        _mode = _CudaToCpuMode()
        # Entered for the life of the process: megatron-core builds tensors on
        # "cuda" from model construction to checkpoint loading.
        _mode.__enter__()
        _installed = True


def is_installed() -> bool:
    """Whether :func:`install` has run in this process."""
    return _installed
