"""Write a torch_dist checkpoint item by item, in bounded memory.

megatron-core's own save stages every tensor of a rank before writing: on CPU it
clones each view (every parameter is a view of DDP's buffer), on GPU it copies
every tensor to the host, and the distributed optimizer's ``fully_reshardable``
format first gathers three fp32 copies of the rank's whole shard. That is what
raised a 0.5B TP=2 run from ~5 GiB per rank to 11-12 GiB at its first save.

Here every entry of the checkpoint is a :class:`Item` whose data is made only
when DCP writes it (a view of a parameter or optimizer state, moved to the host
and serialised one at a time into this rank's single ``.distcp`` file), so a save
holds at most one tensor (two copies of it) beyond training's own memory. The
files are PyTorch DCP's, with megatron-core's ``common.pt`` and ``metadata.json``:
``dist_checkpointing.load`` reads them as its own.
"""

from __future__ import annotations

import errno
import io
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xxhash
from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
from megatron.core.dist_checkpointing.mapping import (
    ShardedObject,
    ShardedTensor,
    ShardedTensorFactory,
    is_main_replica,
)
from megatron.core.dist_checkpointing.serialization import get_default_save_common_strategy
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import (
    SavePlan,
    SavePlanner,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import WriteResult

Resolve = Callable[[], "torch.Tensor | io.BytesIO"]
# torch.save's zip framing around each tensor (measured ~1.2 KB); counted in the
# space a save needs.
_FRAMING_BYTES = 4096


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (disk full, file-size limit, ...); the message
    names the directory and says which checkpoint is still intact."""


@dataclass
class Item:
    """One entry of the checkpoint: a tensor chunk or a serialised object."""

    write: WriteItem
    resolve: Resolve

    @property
    def nbytes(self) -> int:
        """Bytes it takes on disk (tensor data plus framing; objects: an estimate)."""
        data = self.write.tensor_data
        if data is None:
            return _FRAMING_BYTES
        return math.prod(data.chunk.sizes) * data.properties.dtype.itemsize + _FRAMING_BYTES


def tensor_item(
    key: str,
    global_shape: tuple[int, ...],
    offsets: tuple[int, ...],
    sizes: tuple[int, ...],
    dtype: torch.dtype,
    resolve: Resolve,
) -> Item:
    """A chunk ``[offsets, offsets + sizes)`` of the global tensor ``key``."""
    write = WriteItem(
        index=MetadataIndex(key, torch.Size(offsets)),
        type=WriteItemType.SHARD,
        tensor_data=TensorWriteData(
            chunk=ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)),
            properties=TensorProperties(dtype=dtype),
            size=torch.Size(global_shape),
        ),
    )
    return Item(write, resolve)


def object_item(unique_key: str, values: list[Any]) -> Item:
    """megatron-core's encoding of ShardedObjects: ``torch.save`` of their data list."""

    def resolve() -> io.BytesIO:
        buffer = io.BytesIO()
        torch.save(values, buffer)
        buffer.seek(0)
        return buffer

    return Item(WriteItem(index=MetadataIndex(unique_key), type=WriteItemType.BYTE_IO), resolve)


def chunk_of(shard: ShardedTensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """DCP chunk (offsets, sizes) of a ShardedTensor as megatron-core's torch_dist
    strategy lays it out: prepended axes are size-1 dims of the global tensor."""
    sizes = (1,) * shard.prepend_axis_num + tuple(shard.local_shape)
    return tuple(shard.global_offset), sizes


def shards_of(value: Any) -> list[ShardedTensor]:
    """The ShardedTensors one state-dict entry saves as (a factory's, built)."""
    if isinstance(value, ShardedTensorFactory):
        value = value.build()
    out: list[ShardedTensor] = []
    stack = [value]
    while stack:
        item = stack.pop(0)
        if isinstance(item, dict):
            stack[:0] = list(item.values())
        elif isinstance(item, list | tuple):
            stack[:0] = list(item)
        elif isinstance(item, ShardedTensor):
            if item.flattened_range is not None:
                raise ValueError(f"{item.key}: flattened ShardedTensors are not supported")
            out.append(item)
        else:
            raise TypeError(f"unexpected {type(item).__name__} in a sharded state dict entry")
    return out


def items_from_sharded(leaves: Iterable[Any]) -> list[Item]:
    """Write items for the main replicas among ShardedTensors and ShardedObjects
    (megatron-core's ``sharded_state_dict`` leaves, factories already applied).
    Tensor data is resolved when written: a view of the live parameter or state."""
    items: list[Item] = []
    objects: dict[str, list[Any]] = {}
    for leaf in leaves:
        if isinstance(leaf, ShardedObject):
            if is_main_replica(leaf.replica_id):
                objects.setdefault(leaf.unique_key, []).append(leaf.data)
        elif isinstance(leaf, ShardedTensor):
            if leaf.flattened_range is not None:
                raise ValueError(f"{leaf.key}: flattened ShardedTensors are not supported")
            if not is_main_replica(leaf.replica_id):
                continue
            offsets, sizes = chunk_of(leaf)
            data = leaf.data
            items.append(
                tensor_item(
                    leaf.key, tuple(leaf.global_shape), offsets, sizes, leaf.dtype,
                    lambda data=data, sizes=sizes: data.detach().reshape(sizes),
                )
            )
        else:
            raise TypeError(f"cannot save a {type(leaf).__name__} as a sharded entry")
    items += [object_item(key, values) for key, values in objects.items()]
    return items


class _FixedPlanner(SavePlanner):
    """A fixed list of items whose data is made on demand."""

    def __init__(self, items: list[Item]) -> None:
        self.items = {(i.write.index.fqn, i.write.index.offset): i for i in items}
        if len(self.items) != len(items):
            raise ValueError("two checkpoint items share a key and offset")

    def set_up_planner(self, state_dict: Any, storage_meta: Any = None, is_coordinator: bool = False) -> None:
        del state_dict, storage_meta, is_coordinator

    def create_local_plan(self) -> SavePlan:
        return SavePlan([item.write for item in self.items.values()])

    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        return create_default_global_save_plan(all_plans)

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        return new_plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        return self.items[(write_item.index.fqn, write_item.index.offset)].resolve()


class _OneFileWriter(FileSystemWriter):
    """DCP's file-system writer, writing this rank's items into one file, one item
    at a time: each tensor is moved to the host, serialised and released before the
    next is made (DCP's own writer keeps every tensor of a file alive until the file
    closes). Write errors keep their errno, for a clear message."""

    def __init__(self, path: Path, progress: Callable[[int], None] | None = None) -> None:
        super().__init__(str(path), single_file_per_rank=True, thread_count=1, sync_files=True)
        self.progress = progress
        self.written: dict[str, dict[str, Any]] = {}
        """Manifest entries (size, xxh3_64) of the files written, hashed as written."""

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> torch.futures.Future:
        file_name = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"
        results: list[WriteResult] = []
        if plan.items:
            digest = xxhash.xxh3_64()
            with open(Path(self.path) / file_name, "wb") as stream:
                for item in plan.items:
                    data = planner.resolve_data(item)
                    if isinstance(data, torch.Tensor):
                        tensor = data.detach().cpu()
                        if tensor.untyped_storage().nbytes() != tensor.nbytes:
                            tensor = tensor.clone()  # a view: serialise just its values
                        buffer = io.BytesIO()
                        torch.save(tensor, buffer)
                        del tensor, data
                    else:
                        buffer = data
                    offset = stream.tell()
                    view = buffer.getbuffer()
                    digest.update(view)
                    stream.write(view)
                    del view
                    length = stream.tell() - offset
                    del buffer
                    results.append(
                        WriteResult(
                            index=item.index,
                            size_in_bytes=length,
                            storage_data=_StorageInfo(file_name, offset, length),
                        )
                    )
                    if self.progress is not None:
                        self.progress(1)
                stream.flush()
                os.fsync(stream.fileno())
                self.written[file_name] = {"size": stream.tell(), "xxh3_64": digest.hexdigest()}
        future: torch.futures.Future = torch.futures.Future()
        future.set_result(results)
        return future


def write_dcp(
    directory: Path,
    items: list[Item],
    process_group: Any = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Write every rank's ``items`` into the (existing) checkpoint ``directory``;
    returns the manifest entries (size, xxh3_64 hashed while writing) of the data
    files this rank wrote. Collective over ``process_group``."""
    writer = _OneFileWriter(directory, progress)
    dcp_save({}, storage_writer=writer, planner=_FixedPlanner(items), process_group=process_group)
    return writer.written


def write_common(directory: Path, common: dict[str, Any]) -> list[str]:
    """megatron-core's ``common.pt`` and ``metadata.json`` (rank 0 only)."""
    get_default_save_common_strategy().save_common(common, directory)
    save_config(CheckpointingConfig("torch_dist", 1, "torch", 1), str(directory))
    return ["common.pt", "metadata.json"]


def is_out_of_space(exc: BaseException) -> bool:
    """``exc`` (or anything in its chain) is a disk-full or file-size-limit error."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            return True
        text = str(exc)
        if "No space left" in text or "File too large" in text or "Disk quota" in text:
            return True
        # DCP wraps every rank's failure as (exception, traceback) in its failures map.
        failures = getattr(exc, "failures", None)
        if isinstance(failures, dict):
            wrapped = [pair[0] if isinstance(pair, tuple) else pair for pair in failures.values()]
            if any(is_out_of_space(e) for e in wrapped if isinstance(e, BaseException)):
                return True
        exc = exc.__cause__ or exc.__context__
    return False
