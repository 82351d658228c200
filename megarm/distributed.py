"""Process groups, seeding, and every collective megarm itself calls.

Reads torchrun's environment, starts torch.distributed (NCCL on CUDA, gloo on
CPU), lays out megatron-core's tensor / pipeline / data parallel groups, and seeds
every RNG so a run is reproducible. :func:`distributed` wraps it all in a context
manager whose ``finally`` tears the groups down again.

Host values (metrics, flags, counters, Python objects) are reduced here and only
here (:func:`all_reduce_host`, :func:`any_rank`, :func:`all_gather_objects`,
:func:`gather_objects`, :func:`barrier`), on a gloo group over all ranks: NCCL has
no CPU backend, so a CPU tensor all-reduced on the default NCCL group raises, and
moving a handful of floats to the GPU for the reduction would cost a blocking copy
each way. Device tensors of the model stay megatron-core's business (its groups).
A test walks the sources so that no other module calls torch.distributed's
collectives directly.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megarm import lifecycle, platform

# The gloo group host values are reduced on (None: the default group, when it is
# gloo itself). Set by init(), cleared by teardown().
_HOST_GROUP: dist.ProcessGroup | None = None


@dataclass(frozen=True)
class LaunchEnv:
    """What torchrun tells a process about itself."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    @classmethod
    def from_environ(cls) -> LaunchEnv:
        """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``.

        A plain ``python -m`` launch (no torchrun) is a world of one.
        """
        env = os.environ
        try:
            return cls(
                rank=int(env.get("RANK", "0")),
                world_size=int(env.get("WORLD_SIZE", "1")),
                local_rank=int(env.get("LOCAL_RANK", "0")),
                master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                master_port=int(env.get("MASTER_PORT", "29500")),
            )
        except ValueError as exc:
            raise RuntimeError(f"malformed torchrun environment variable: {exc}") from exc


def world_size_from_environ() -> int:
    """The world size torchrun will give (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: int | None = None,
    seed: int = 1234,
    timeout_minutes: int = 30,
    expert_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
) -> LaunchEnv:
    """Start torch.distributed and megatron-core's parallel groups (with the
    expert-parallel and expert-data-parallel ones), then seed."""
    from megatron.core import parallel_state

    lifecycle.install()  # workers die with torchrun; nothing they start outlives them
    platform.activate()
    launch = LaunchEnv.from_environ()
    platform.set_local_device(launch.local_rank)
    if not dist.is_initialized() and launch.world_size == 1:
        # One process (converters, scoring, a plain ``python -m``): an in-memory
        # store (a TCPStore listens on every interface), and gloo's sockets on
        # loopback rather than on the address the hostname resolves to.
        if os.path.exists("/sys/class/net/lo"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        dist.init_process_group(
            backend=platform.dist_backend(),
            store=dist.HashStore(),
            rank=0,
            world_size=1,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", launch.master_addr)
        os.environ.setdefault("MASTER_PORT", str(launch.master_port))
        dist.init_process_group(
            backend=platform.dist_backend(),
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    _init_host_group()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
        context_parallel_size=context_parallel_size,
    )
    # Explicitly, so megatron-core does not warn about an implicit init; megarm
    # does not use its rerun / fault-injection machinery.
    import logging

    from megatron.core.rerun_state_machine import (
        RerunMode,
        initialize_rerun_state_machine,
    )

    rerun_log = logging.getLogger("megatron.core.rerun_state_machine")
    level = rerun_log.level
    rerun_log.setLevel(logging.ERROR)
    initialize_rerun_state_machine(mode=RerunMode.DISABLED)
    rerun_log.setLevel(level)
    set_seed(seed)
    return launch


def init_from_config(cfg) -> LaunchEnv:  # noqa: ANN001 - a megarm.config.MegarmConfig
    """:func:`init` with the layout and seed of a resolved config."""
    p = cfg.parallel
    platform.set_deterministic(cfg.training.deterministic)
    return init(
        p.tensor_model_parallel_size,
        p.pipeline_model_parallel_size,
        p.virtual_pipeline_model_parallel_size,
        seed=cfg.training.seed,
        expert_model_parallel_size=p.expert_model_parallel_size,
        context_parallel_size=p.context_parallel_size,
    )


def set_seed(seed: int) -> None:
    """Seed Python, NumPy, torch and megatron-core's model-parallel RNG tracker.

    Every rank of a pipeline stage gets a stage-specific base seed (as in
    Megatron-LM) so stages do not draw identical dropout masks; the tracker then
    derives the tensor-parallel seeds.
    """
    from megatron.core import parallel_state, tensor_parallel

    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)


def teardown() -> None:
    """Destroy megatron-core's groups and the default process group."""
    global _HOST_GROUP
    from megatron.core import parallel_state
    from megatron.core.rerun_state_machine import destroy_rerun_state_machine

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    destroy_rerun_state_machine()  # init sets it up again (one process, several models)
    _HOST_GROUP = None
    if dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- host collectives


def _init_host_group() -> None:
    """Create the gloo group for host values (every rank calls this in the same order)."""
    global _HOST_GROUP
    if dist.get_backend() == "gloo":
        _HOST_GROUP = None  # the default group already reduces CPU tensors
    else:
        _HOST_GROUP = dist.new_group(backend="gloo")


def host_group() -> dist.ProcessGroup | None:
    """The process group host values are reduced on (``None`` = the default group)."""
    return _HOST_GROUP


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def all_reduce_host(values: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce a host tensor over all ranks (``op``: sum, max or min); returns a CPU
    tensor. A device tensor is brought to the host first (one copy, at the caller's
    chosen point of the step, never inside it)."""
    values = values.detach().cpu().clone()
    if _active():
        dist.all_reduce(values, op=_OPS[op], group=_HOST_GROUP)
    return values


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank."""
    return bool(all_reduce_host(torch.tensor([float(flag)]), "max").item())


def all_gather_objects(obj: object) -> list[object]:
    """Every rank's ``obj`` (picklable), by rank, on every rank."""
    if not _active():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=_HOST_GROUP)
    return out


def gather_objects(obj: object, dst: int = 0) -> list[object] | None:
    """Every rank's ``obj`` by rank on rank ``dst``; ``None`` elsewhere."""
    if not _active():
        return [obj]
    rank = dist.get_rank()
    out: list[object] | None = [None] * dist.get_world_size() if rank == dst else None
    dist.gather_object(obj, out, dst=dst, group=_HOST_GROUP)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s ``obj`` on every rank."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_HOST_GROUP)
    return box[0]


def barrier() -> None:
    """Wait for every rank (on the host group: no device work is implied)."""
    if _active():
        dist.barrier(group=_HOST_GROUP)


@contextlib.contextmanager
def distributed(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: int | None = None,
    seed: int = 1234,
) -> Iterator[LaunchEnv]:
    """``init`` on entry, ``teardown`` on exit, whatever happened in between."""
    try:
        yield init(
            tensor_model_parallel_size,
            pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size,
            seed,
        )
    finally:
        teardown()


@contextlib.contextmanager
def distributed_from_config(cfg) -> Iterator[LaunchEnv]:  # noqa: ANN001
    """:func:`distributed` with the layout and seed of a resolved config."""
    try:
        yield init_from_config(cfg)
    finally:
        teardown()


def all_gather_device(chunks: list[torch.Tensor], tensor: torch.Tensor, group: dist.ProcessGroup) -> None:
    """``torch.distributed.all_gather`` of a device tensor on ``group`` (megatron-core's
    own groups; used by the CPU fix for its uneven token gather in platform/)."""
    torch.distributed.all_gather(chunks, tensor, group=group)


def all_reduce_device(tensor: torch.Tensor, group: dist.ProcessGroup) -> None:
    """``torch.distributed.all_reduce`` (sum) of a device tensor on ``group``, in place."""
    torch.distributed.all_reduce(tensor, group=group)


# --------------------------------------------------------------------------- context parallelism


def _reduce_scatter_first_dim(full: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``full`` ``[size, ...]`` summed over ``group``; this rank's slice ``[...]``.
    gloo has no reduce-scatter, so there the whole tensor is all-reduced and sliced
    (the same sum; size x the traffic, which only CPU runs pay)."""
    rank = dist.get_rank(group)
    if dist.get_backend(group) == "gloo":
        full = full.contiguous()
        dist.all_reduce(full, group=group)
        return full[rank]
    out = torch.empty_like(full[rank])
    dist.reduce_scatter_tensor(out, full.contiguous(), group=group)
    return out


class _GatherContext(torch.autograd.Function):
    """All-gather over the context-parallel group; the backward reduce-scatters
    (each rank's K/V feed every rank's queries, so its gradient is their sum)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:  # noqa: ANN001
        ctx.group = group
        size = dist.get_world_size(group)
        out = torch.empty((size, *tensor.shape), dtype=tensor.dtype, device=tensor.device)
        dist.all_gather(list(out.unbind(0)), tensor.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        return _reduce_scatter_first_dim(grad, ctx.group), None


class _SumContext(torch.autograd.Function):
    """Sum over the context-parallel group; the backward is the identity: every rank
    computes the same loss from the sum, and each passes the gradient to its own
    addend (megatron-core's schedule and DDP then add the ranks' gradients)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:  # noqa: ANN001
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        return grad, None


def gather_context(tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Every context-parallel rank's ``tensor`` stacked by rank, ``[cp, ...]``
    (differentiable: the backward reduce-scatters)."""
    return _GatherContext.apply(tensor, group)


def sum_context(tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``tensor`` summed over the context-parallel group (differentiable: the
    backward passes each rank's gradient to its own addend)."""
    return _SumContext.apply(tensor, group)
