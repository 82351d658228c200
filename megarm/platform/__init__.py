"""Device facts: the only place in megarm that knows about CPU versus CUDA.

Everything else asks this module which device a rank computes on, the
process-group backend, which optional kernels exist (transformer-engine, apex's
fused softmax), where batches are staged (pinned memory) and what the device
holds in memory; and calls :func:`activate` once per process before touching
megatron-core. On CUDA ``activate`` sets the environment megatron-core's overlap
needs; without CUDA it installs :mod:`megarm.platform.cpu_compat`, which lets
megatron-core's CUDA-only code paths run on CPU with gloo. (The parameter dtype
and the layer spec are chosen from these facts in :mod:`megarm.model.builder`.)
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from dataclasses import dataclass
from functools import lru_cache

import torch

from megarm.platform import cpu_compat, mcore_fixes, optim_kernels

__all__ = [
    "DeterministicSettings",
    "DeviceError",
    "activate",
    "apply_adam_kernel",
    "deterministic_settings",
    "device",
    "dist_backend",
    "has_apex",
    "has_fused_adam",
    "has_fused_softmax",
    "has_transformer_engine",
    "is_cuda",
    "max_memory_allocated",
    "missing_kernels_note",
    "max_memory_reserved",
    "pin_memory",
    "set_deterministic",
    "set_local_device",
    "synchronize",
    "torch_fused_adam",
]


class DeviceError(RuntimeError):
    """This process cannot be placed on a device as launched; the message says why."""


@lru_cache(maxsize=1)
def is_cuda() -> bool:
    """True when this process trains on CUDA GPUs.

    ``MEGARM_DEVICE=cpu`` forces the CPU path on a GPU machine (for debugging and
    for comparing against the fp32 CPU reference).
    """
    if os.environ.get("MEGARM_DEVICE", "").lower() == "cpu":
        return False
    return torch.cuda.is_available()


DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
"""megarm's dtype names (``model.params_dtype``, the converters' ``--params-dtype``)."""

# The other spellings of the same dtypes: HF config.json's and safetensors headers'.
_DTYPE_ALIASES = {
    "float32": "fp32", "bfloat16": "bf16", "float16": "fp16",
    "F32": "fp32", "BF16": "bf16", "F16": "fp16",
}


def dtype(name: str) -> torch.dtype:
    """The torch dtype of a megarm dtype name; ``auto`` is bf16 on CUDA, fp32 on CPU."""
    if name == "auto":
        name = "bf16" if is_cuda() else "fp32"
    return DTYPES[name]


def dtype_name(value: torch.dtype | str) -> str | None:
    """megarm's name (``fp32``/``bf16``/``fp16``) of a torch dtype, an HF config.json
    dtype or a safetensors header dtype; ``None`` when it is none of those."""
    if isinstance(value, torch.dtype):
        return next((k for k, v in DTYPES.items() if v == value), None)
    return value if value in DTYPES else _DTYPE_ALIASES.get(value)


def device() -> torch.device:
    """The device this rank computes on."""
    if is_cuda():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def dist_backend() -> str:
    """torch.distributed backend: NCCL on CUDA, gloo on CPU.

    ``MEGARM_DIST_BACKEND=gloo`` runs CUDA ranks over gloo instead, which lets several
    ranks share one GPU (tests and checks of TP/PP on a one-GPU machine; NCCL refuses
    two ranks on one device).
    """
    forced = os.environ.get("MEGARM_DIST_BACKEND", "").lower()
    if forced:
        if forced not in ("gloo", "nccl"):
            raise DeviceError(f"MEGARM_DIST_BACKEND={forced!r}: use 'gloo' or 'nccl'")
        return forced
    return "nccl" if is_cuda() else "gloo"


def set_local_device(local_rank: int) -> None:
    """Bind this process to its GPU (no-op on CPU).

    A local rank without a GPU of its own is an error under NCCL ("Duplicate GPU
    detected" otherwise, after minutes of start-up); under gloo
    (``MEGARM_DIST_BACKEND=gloo``) ranks may share GPUs round-robin.
    """
    if not is_cuda():
        return
    count = torch.cuda.device_count()
    if local_rank >= count and dist_backend() == "nccl":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise DeviceError(
            f"local rank {local_rank} has no GPU of its own: this node shows {count} GPU(s)"
            + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else "")
            + f"; launch at most {count} process(es) per node (torchrun --nproc_per_node "
            f"{count}), or set MEGARM_DIST_BACKEND=gloo to share GPUs in a test"
        )
    torch.cuda.set_device(local_rank % count)


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


def moe_grouped_gemm() -> bool:
    """Run a mixture-of-experts layer's experts as one grouped GEMM
    (transformer-engine's ``TEGroupedMLP``, on CUDA with TE) rather than megatron-core's
    ``SequentialMLP`` (one expert after another; the CPU path). Both give the same
    checkpoint keys."""
    return has_transformer_engine()


@lru_cache(maxsize=1)
def has_apex() -> bool:
    """apex is importable (used for fused kernels when the user built it)."""
    return is_cuda() and importlib.util.find_spec("apex") is not None


# megatron-core's FusedScaleMaskSoftmax imports these CUDA extensions, which apex
# builds; transformer-engine does not ship them.
_SOFTMAX_EXTENSIONS = ("scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda")


@lru_cache(maxsize=1)
def has_fused_softmax() -> bool:
    """The fused masked-softmax CUDA extensions megatron-core's unfused attention can
    use are importable (not merely transformer-engine: TE lacks them)."""
    return is_cuda() and all(
        importlib.util.find_spec(name) is not None for name in _SOFTMAX_EXTENSIONS
    )


def pin_memory() -> bool:
    """Stage batches in page-locked host memory (CUDA): the copy to the device is
    then asynchronous and overlaps compute."""
    return is_cuda()


def synchronize() -> None:
    """Wait for queued device work (timings must include it on CUDA)."""
    if is_cuda():
        torch.cuda.synchronize()


def max_memory_allocated() -> int:
    """Peak bytes allocated on the device by this process (0 where unknown)."""
    if is_cuda():
        return int(torch.cuda.max_memory_allocated())
    return 0


def max_memory_reserved() -> int:
    """Peak bytes the caching allocator reserved on the device (allocated plus its
    cache and fragmentation; what the device must really hold), 0 where unknown."""
    if is_cuda():
        return int(torch.cuda.max_memory_reserved())
    return 0


def has_fused_adam() -> bool:
    """The optimizer's Adam step makes no parameter-sized temporaries: a fused Adam,
    transformer-engine's or apex's (megatron-core's own choice) or torch's
    (:func:`torch_fused_adam`)."""
    return has_transformer_engine() or has_apex() or torch_fused_adam()


def torch_fused_adam() -> bool:
    """megatron-core builds torch's AdamW here (no transformer-engine / apex), and
    megarm switches it to torch's fused kernel (which exists for this device).
    ``MEGARM_FUSED_ADAM=0`` keeps torch's default (single-tensor on CPU, foreach on
    CUDA), for comparisons."""
    if has_transformer_engine() or has_apex():
        return False
    if os.environ.get("MEGARM_FUSED_ADAM", "1") == "0":
        return False
    return optim_kernels.torch_fused_adam_supported(device().type)


def apply_adam_kernel(optimizer: object) -> None:
    """Run megatron-core's torch AdamW (if that is what it built) as
    :func:`torch_fused_adam` says; after building and after loading a checkpoint
    (see :func:`megarm.platform.optim_kernels.apply_adam_kernel`)."""
    optim_kernels.apply_adam_kernel(optimizer, torch_fused_adam())


# megatron-core warns at import about optional kernels; on a machine without them
# (every CPU machine) these are expected and would bury the training output.
_EXPECTED_WARNINGS = (
    r"Transformer Engine and Apex are not installed.*",
    r"Apex is not installed\. Falling back to Torch Norm",
    r"full scope is deprecated.*",
    # megatron-core 0.16's dist_checkpointing still calls these torch APIs.
    r"`load_state_dict` is deprecated.*",
    r"Please use DTensor instead and we are deprecating ShardedTensor.*",
    r"`torch.distributed.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated.*",
)


# On CPU there is no CUDA stream to order: megatron-core's advice to set it is noise.
_CPU_WARNINGS = (r".*recommended to set the environment variable CUDA_DEVICE_MAX_CONNECTIONS.*",)


def quiet_expected_warnings() -> None:
    """Silence megatron-core's warnings about optional fused kernels being absent
    (:func:`note_missing_kernels` says it once instead) and, on CPU, about CUDA
    stream settings. The first part runs when this module is imported: importing
    :mod:`megarm.platform` before megatron-core is enough."""
    _quiet_kernel_warnings()
    if not is_cuda():
        for pattern in _CPU_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)


def _quiet_kernel_warnings() -> None:
    for pattern in _EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


_noted: list[bool] = []


def missing_kernels_note() -> str | None:
    """The one line saying which optional kernels are absent and why that is fine
    here; ``None`` when transformer-engine and apex are both usable."""
    missing = [name for name, found in (("transformer-engine", has_transformer_engine()),
                                        ("apex", has_apex())) if not found]
    if not missing:
        return None
    what = " and ".join(missing)
    if not is_cuda():
        return (f"note: {what} not installed (they need CUDA): on this CPU machine megarm uses "
                "its SDPA attention, torch's norms and torch's AdamW; results are the same, "
                "megatron-core's warnings about it are silenced")
    return (f"note: {what} not installed: megarm uses its SDPA attention, torch's norms and "
            "AdamW (same results, slower; `pip install megarm[gpu]` adds them)")


def note_missing_kernels() -> None:
    """Print :func:`missing_kernels_note` once per run: on the first rank only, once
    per process."""
    if _noted or os.environ.get("RANK", "0") != "0":
        return
    _noted.append(True)
    if (line := missing_kernels_note()) is not None:
        print(line, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class DeterministicSettings:
    """What ``training.deterministic`` sets on one kind of device."""

    warn_only: bool
    """``torch.use_deterministic_algorithms(True, warn_only=...)``: False raises on an
    op without a deterministic implementation instead of running it anyway."""
    cublas_workspace: str | None
    """``CUBLAS_WORKSPACE_CONFIG`` (cuBLAS's fixed workspace; read when cuBLAS starts)."""
    cudnn_deterministic: bool
    """``torch.backends.cudnn.deterministic`` (and ``benchmark`` off)."""


def deterministic_settings(enabled: bool, cuda: bool) -> DeterministicSettings | None:
    """The settings ``training.deterministic`` means on CUDA or CPU (``None`` when off).

    CUDA: strict mode (``warn_only=False``). With ``warn_only=True`` torch only warns
    and still runs the non-deterministic kernels (SDPA's memory-efficient and flash
    backward where no ordered variant exists, the ``index_put`` backward of the reward
    gather, scatter-adds), so a "deterministic" run would not be; strict mode picks the
    ordered implementations where torch has them and stops with the op's name where it
    has none. Plus cuBLAS's fixed workspace and deterministic cuDNN without autotuning.
    CPU: torch's CPU kernels are deterministic already; deterministic mode stays
    warn-only there (its alerts concern CUDA kernels).
    """
    if not enabled:
        return None
    if cuda:
        return DeterministicSettings(warn_only=False, cublas_workspace=":4096:8",
                                     cudnn_deterministic=True)
    return DeterministicSettings(warn_only=True, cublas_workspace=None, cudnn_deterministic=False)


def set_deterministic(enabled: bool, cuda: bool | None = None) -> DeterministicSettings | None:
    """Apply :func:`deterministic_settings` for this process's device (``cuda``:
    default :func:`is_cuda`) and return them. A ``CUBLAS_WORKSPACE_CONFIG`` the user
    set is kept."""
    settings = deterministic_settings(enabled, is_cuda() if cuda is None else cuda)
    if settings is None:
        return None
    if settings.cublas_workspace:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", settings.cublas_workspace)
    if settings.cudnn_deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=settings.warn_only)
    return settings


def cuda_environment() -> None:
    """Environment megatron-core's CUDA paths expect, set before CUDA starts.

    ``CUDA_DEVICE_MAX_CONNECTIONS=1`` makes the GPU run kernels in launch order,
    which megatron-core's tensor-parallel communication overlap (sequence parallel,
    async grad all-reduce) relies on; megatron-core warns without it. A value the
    user set is kept.
    """
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")


def activate() -> None:
    """Prepare this process for megatron-core. Idempotent.

    On CUDA this sets :func:`cuda_environment`; on CPU it installs the
    compatibility layer; everywhere it quiets the warnings about optional kernels
    and, when apex / TE are absent, fixes the distributed optimizer's checkpoint
    loading (:mod:`megarm.platform.mcore_fixes`) and gives grad norm and clipping
    multi-tensor, in-place kernels (:mod:`megarm.platform.optim_kernels`).
    """
    quiet_expected_warnings()
    note_missing_kernels()
    if is_cuda():
        cuda_environment()
    else:
        cpu_compat.install()
    mcore_fixes.install()
    optim_kernels.install_multi_tensor_grads()


# Importing megarm.platform before megatron-core keeps its import-time warnings away.
_quiet_kernel_warnings()
