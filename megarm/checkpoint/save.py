"""Save a training checkpoint: model, optimizer, scheduler, RNG, data position.

The checkpoint is written into ``iter_XXXXXXX.tmp`` by every rank (each its own
file, item by item: :mod:`megarm.checkpoint.writer`), described by an integrity
manifest, then renamed and made the tracker's, so an interrupted or failed save
never hides the previous checkpoint. Before writing, the free space of the
filesystem is checked against the checkpoint's size.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedBase, ShardedObject
from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess

from megarm import distributed, platform
from megarm.checkpoint.integrity import (
    MANIFEST,
    describe_files,
    disk_free_bytes,
    human_bytes,
    write_manifest,
)
from megarm.checkpoint.layout import (
    completed_iterations,
    iteration_dir,
    prune,
    staging_dir,
    write_tracker,
)
from megarm.checkpoint.optimizer_state import optimizer_state_for_save
from megarm.checkpoint.writer import (
    CheckpointWriteError,
    Item,
    is_out_of_space,
    items_from_sharded,
    write_common,
    write_dcp,
)

# Space kept free beyond the checkpoint itself (logs, the tracker, the filesystem).
_HEADROOM = 256 * 2**20


def model_sharded_state_dict(model: list[torch.nn.Module]) -> dict[str, Any]:
    """Sharded state dict of every model chunk (``model`` or ``model0``, ``model1``...)."""
    chunks = [getattr(m, "module", m) for m in model]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def layout() -> tuple[int, ...]:
    """(PP, TP, DP) sizes of this run, and CP when it is above 1: RNG states are saved
    per rank of this grid (a CP=1 run keeps the three-entry grid of older checkpoints)."""
    grid = (
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_data_parallel_world_size(),
    )
    cp = ps.get_context_parallel_world_size()
    return grid if cp == 1 else (*grid, cp)


def rng_sharded_object() -> ShardedObject:
    """Every RNG this rank draws from, as one ShardedObject of the :func:`layout` grid."""
    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if platform.is_cuda():
        state["cuda"] = torch.cuda.get_rng_state()
    offset = (
        ps.get_pipeline_model_parallel_rank(),
        ps.get_tensor_model_parallel_rank(),
        ps.get_data_parallel_rank(),
    )
    if ps.get_context_parallel_world_size() > 1:
        offset = (*offset, ps.get_context_parallel_rank())
    return ShardedObject("rng_state", state, layout(), offset, replica_id=0)


def _leaves(tree: Any) -> Iterator[Any]:
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(value)
    elif isinstance(tree, list | tuple):
        for value in tree:
            yield from _leaves(value)
    elif isinstance(tree, ShardedBase):
        yield tree


def checkpoint_items(
    model: list[torch.nn.Module],
    common: dict[str, Any],
    optimizer: Any = None,
    scheduler: Any = None,
) -> tuple[list[Item], dict[str, Any]]:
    """This rank's items and the common (rank-0, plain-data) state of a checkpoint."""
    state = model_sharded_state_dict(model)
    state.update(common)
    state["checkpoint_layout"] = list(layout())
    extra: list[Item] = []
    if optimizer is not None:
        state["optimizer"], extra = optimizer_state_for_save(optimizer, model_sharded_state_dict(model))
        state["opt_param_scheduler"] = scheduler.state_dict() if scheduler is not None else None
        state["rng_state"] = rng_sharded_object()
    sharded, common_state = save_preprocess(state, validate_access_integrity=False)
    return items_from_sharded(_leaves(sharded)) + extra, common_state


def save_checkpoint(
    save: str | Path,
    iteration: int,
    model: list[torch.nn.Module],
    common: dict[str, Any],
    optimizer: Any = None,
    scheduler: Any = None,
    keep_last: int | None = None,
) -> Path:
    """Write a checkpoint at ``iteration`` atomically and return its directory.

    ``common`` is plain Python data stored once (config, data position). With an
    ``optimizer`` the checkpoint also holds its (possibly distributed) state, the
    scheduler and every rank's RNG state, so a resumed run is exact. Raises
    :class:`CheckpointWriteError` (on every rank) when the filesystem lacks the
    space or a write fails; the partial directory is removed and the previous
    checkpoint stays the tracker's.
    """
    root = Path(save)
    final = iteration_dir(root, iteration)
    tmp = staging_dir(final)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    previous = completed_iterations(root)
    intact = (
        f"the previous checkpoint (iteration {previous[-1]}) is intact" if previous
        else "no earlier checkpoint exists in it"
    )
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("iter_*.tmp"):  # left by a killed save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    distributed.barrier()
    items, common_state = checkpoint_items(model, common, optimizer, scheduler)
    needed = int(distributed.all_reduce_host(torch.tensor([sum(i.nbytes for i in items)], dtype=torch.float64)).item())
    problem = None
    if rank == 0:
        free = disk_free_bytes(root)
        if free < needed + _HEADROOM:
            problem = (
                f"not enough space on {root} to save iteration {iteration}: the checkpoint needs "
                f"{human_bytes(needed)}, {human_bytes(free)} are free; {intact}. Free space (or "
                "lower checkpoint.keep_last) and resume"
            )
    problem = distributed.broadcast_object(problem)
    try:
        if problem:
            raise CheckpointWriteError(problem)
        try:
            files = write_dcp(tmp, items, distributed.host_group())
            if rank == 0:
                write_common(tmp, common_state)
                files.update(describe_files(tmp, [".metadata", "common.pt", "metadata.json"]))
        except BaseException as exc:  # noqa: BLE001 - turned into one clear error below
            if is_out_of_space(exc):
                raise CheckpointWriteError(
                    f"no space left on {root} while saving iteration {iteration} (or a file-size "
                    f"limit was hit); {intact}. The partial save was removed"
                ) from exc
            raise
        gathered = distributed.gather_objects(files)
        if rank == 0:
            manifest: dict[str, Any] = {}
            for part in gathered or []:
                manifest.update(part)
            write_manifest(tmp, manifest)
        distributed.barrier()
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        write_tracker(root, iteration)
        if keep_last:
            prune(root, keep_last)
    distributed.barrier()
    return final


__all__ = [
    "MANIFEST",
    "CheckpointWriteError",
    "checkpoint_items",
    "layout",
    "model_sharded_state_dict",
    "rng_sharded_object",
    "save_checkpoint",
]
