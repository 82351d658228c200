"""Process groups and seeding for one megarm process.

Reads torchrun's environment, starts torch.distributed (NCCL on CUDA, gloo on
CPU), lays out megatron-core's tensor / pipeline / data parallel groups, and seeds
every RNG so a run is reproducible. :func:`distributed` wraps it all in a context
manager whose ``finally`` tears the groups down again.
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

from megarm import platform


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
) -> LaunchEnv:
    """Start torch.distributed and megatron-core's parallel groups, then seed."""
    from megatron.core import parallel_state

    platform.activate()
    launch = LaunchEnv.from_environ()
    platform.set_local_device(launch.local_rank)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", launch.master_addr)
        os.environ.setdefault("MASTER_PORT", str(launch.master_port))
        dist.init_process_group(
            backend=platform.dist_backend(),
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
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
    return init(
        p.tensor_model_parallel_size,
        p.pipeline_model_parallel_size,
        p.virtual_pipeline_model_parallel_size,
        seed=cfg.training.seed,
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
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


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
