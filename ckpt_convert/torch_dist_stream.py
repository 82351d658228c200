"""Read and write megarm's torch_dist checkpoints one tensor at a time.

megatron-core's ``dist_checkpointing.save`` wants every tensor of the model in
memory at once, and its ``load`` fills a whole model. A converter only needs one
layer at a time, so both directions here work from the model's *sharded state dict
built on the meta device* (every checkpoint key, global shape and offset the
trainer uses, without a byte of weights):

- :func:`save_streaming` turns those ShardedTensors into PyTorch DCP write items
  (the chunk layout megatron-core's torch_dist strategy writes: one chunk per layer
  of a stacked ``decoder.layers.*`` tensor, prepended axes as size-1 dims) and a
  planner whose ``resolve_data`` asks for each model tensor only when DCP writes
  it. Every item goes to its own file (DCP's ``single_file_per_rank=False``), so a
  written tensor is freed before the next is made: peak memory is one model tensor
  plus what the caller needs to make it.
- :func:`load_tensors` reads a chosen subset of state-dict names with a DCP load
  planner whose targets are the chunks a TP=1, PP=1 model would hold: DCP's own
  resharding picks the overlapping stored chunks, so any saved TP/PP works, and
  nothing outside the requested layers is read. (megatron-core's ``load`` cannot
  be asked for some layers of a stacked tensor in one process.)

``common.pt`` and ``metadata.json`` are written with megatron-core's own savers, so
``dist_checkpointing.load`` cannot tell a streamed checkpoint from one it wrote.
"""

from __future__ import annotations

import copy
import io
import logging
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
from megatron.core.dist_checkpointing.mapping import (
    ShardedObject,
    ShardedTensor,
    ShardedTensorFactory,
    is_main_replica,
)
from megatron.core.dist_checkpointing.serialization import get_default_save_common_strategy
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

log = logging.getLogger("torch_dist_stream")

Produce = Callable[[str], torch.Tensor]


def meta_sharded_state_dict(cfg: Any) -> dict[str, Any]:
    """megarm's sharded state dict for ``cfg`` at the current (TP, PP) layout, from a
    model built on the meta device: keyed by state-dict name, no weights allocated.

    Always megatron-core's local layer spec, whose state-dict names are the ones
    :mod:`ckpt_convert.qwen2_mapping` calls ``local``; torch_dist checkpoint keys do
    not depend on the spec. Needs megatron-core's parallel state
    (``megarm.distributed.init``).
    """
    from megarm.model.builder import build_model

    cfg = copy.deepcopy(cfg)
    cfg.model.attention_backend = "sdpa"
    (model,) = build_model(cfg, device="meta")
    return model.sharded_state_dict()


def _shards(value: Any) -> list[ShardedTensor]:
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
                raise ValueError(f"{item.key}: flattened ShardedTensors cannot be streamed")
            out.append(item)
        else:
            raise TypeError(f"unexpected {type(item).__name__} in a sharded state dict entry")
    return out


def _with_data(value: Any, data: torch.Tensor) -> Any:
    """``value`` (a ShardedTensor or factory) holding ``data`` instead of its meta tensor."""
    if isinstance(value, ShardedTensorFactory):
        return replace(value, data=data)
    return replace(value, data=data.view(value.local_shape))


def _chunk(shard: ShardedTensor) -> tuple[torch.Size, torch.Size]:
    """DCP chunk (offsets, sizes) of a ShardedTensor, as megatron-core's torch_dist
    strategy lays it out: prepended axes are size-1 dims of the global tensor."""
    sizes = (1,) * shard.prepend_axis_num + tuple(shard.local_shape)
    return torch.Size(shard.global_offset), torch.Size(sizes)


class _StreamingPlanner(SavePlanner):
    """A fixed list of write items whose data is made on demand by ``resolve``."""

    def __init__(self, items: list[WriteItem], resolve: Callable[[WriteItem], Any]) -> None:
        self.items = items
        self.resolve = resolve

    def set_up_planner(self, state_dict: Any, storage_meta: Any = None, is_coordinator: bool = False) -> None:
        del state_dict, storage_meta, is_coordinator  # the items are fixed up front

    def create_local_plan(self) -> SavePlan:
        return SavePlan(self.items)

    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        return create_default_global_save_plan(all_plans)

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        return new_plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        return self.resolve(write_item)


def save_streaming(
    out: Path,
    sharded: dict[str, Any],
    produce: Produce,
    order: Sequence[str],
    common: dict[str, Any],
) -> int:
    """Write a torch_dist checkpoint into the existing, empty directory ``out``.

    ``sharded`` is a (meta) sharded state dict from :func:`meta_sharded_state_dict`;
    ``produce(name)`` returns the full tensor of state-dict entry ``name`` (its shape
    and dtype), called once per name in ``order``, which must name every tensor
    entry. ``common`` is stored in ``common.pt``. Returns the bytes of tensor data.
    """
    tensors = {k: v for k, v in sharded.items() if isinstance(v, ShardedTensor | ShardedTensorFactory)}
    objects = [v for v in sharded.values() if isinstance(v, ShardedObject)]
    other = [k for k, v in sharded.items() if not isinstance(v, ShardedTensor | ShardedTensorFactory | ShardedObject)]
    if other:  # nothing may be left out of the checkpoint silently
        raise TypeError(f"cannot stream sharded state dict entries {other[:3]} (not tensors or objects)")
    ordered = set(order)
    missing = [name for name in tensors if name not in ordered]
    unknown = [name for name in order if name not in tensors]
    if missing or unknown:
        raise ValueError(
            f"streamed names do not match the model: missing {missing[:3]}, unknown {unknown[:3]}"
        )

    items: list[WriteItem] = []
    source: dict[tuple[str, tuple[int, ...] | None], tuple[str, int]] = {}
    for obj in objects:
        index = MetadataIndex(obj.unique_key)
        items.append(WriteItem(index=index, type=WriteItemType.BYTE_IO))
        source[(obj.unique_key, None)] = (obj.unique_key, -1)
    total = 0
    for name in order:
        for position, shard in enumerate(_shards(tensors[name])):
            if not is_main_replica(shard.replica_id):
                continue
            offsets, sizes = _chunk(shard)
            items.append(
                WriteItem(
                    index=MetadataIndex(shard.key, offsets),
                    type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        chunk=ChunkStorageMetadata(offsets=offsets, sizes=sizes),
                        properties=TensorProperties(dtype=shard.dtype),
                        size=torch.Size(shard.global_shape),
                    ),
                )
            )
            source[(shard.key, tuple(offsets))] = (name, position)
            total += sizes.numel() * shard.dtype.itemsize
    by_key = {obj.unique_key: obj for obj in objects}
    cache: dict[str, list[ShardedTensor]] = {}
    progress = _Progress(sum(1 for item in items if item.type != WriteItemType.BYTE_IO))

    def resolve(item: WriteItem) -> torch.Tensor | io.BytesIO:
        offset = tuple(item.index.offset) if item.index.offset is not None else None
        name, position = source[(item.index.fqn, offset)]
        if position < 0:
            buffer = io.BytesIO()
            torch.save([by_key[name].data], buffer)  # megatron-core's ShardedObject encoding
            buffer.seek(0)
            return buffer
        if name not in cache:
            cache.clear()  # one entry's tensor alive at a time (a factory has several chunks)
            meta = tensors[name]
            data = produce(name)
            expected = meta.data.shape
            if tuple(data.shape) != tuple(expected) or data.dtype != meta.data.dtype:
                raise ValueError(
                    f"{name}: made {tuple(data.shape)} {data.dtype}, the model has "
                    f"{tuple(expected)} {meta.data.dtype}"
                )
            cache[name] = _shards(_with_data(meta, data.contiguous()))
        shard = cache[name][position]
        progress.update(1)
        return shard.data.reshape(item.tensor_data.chunk.sizes)

    planner = _StreamingPlanner(items, resolve)
    # per_thread_copy_ahead=0: DCP's serial CPU loader. Its overlapping loader (the
    # default wherever CUDA is available) would start a CUDA context in a CPU tool.
    writer = FileSystemWriter(
        str(out), single_file_per_rank=False, thread_count=1, per_thread_copy_ahead=0
    )
    dcp_save({}, storage_writer=writer, planner=planner)  # the one-rank process group
    progress.close()
    cache.clear()
    get_default_save_common_strategy().save_common(common, out)
    save_config(CheckpointingConfig("torch_dist", 1, "torch", 1), str(out))
    return total


class _ChunkLoadPlanner(LoadPlanner):
    """Reads stored data into fixed target chunks (views of the tensors being filled),
    whatever chunking the checkpoint was saved with."""

    def __init__(self, targets: dict[tuple[str, tuple[int, ...]], torch.Tensor]) -> None:
        self.targets = targets

    def set_up_planner(self, state_dict: Any, metadata: Any = None, is_coordinator: bool = False) -> None:
        del state_dict, is_coordinator
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        stored = self.metadata.state_dict_metadata
        items: list[ReadItem] = []
        for (fqn, offsets), target in self.targets.items():
            if fqn not in stored:
                raise KeyError(f"{fqn} is not in the checkpoint")
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=target.shape)
            reads = create_read_items_for_chunk_list(fqn, stored[fqn], [chunk])
            covered = sum(math.prod(read.lengths) for read in reads)
            if covered != target.numel():
                raise ValueError(
                    f"the checkpoint holds {covered} of the {target.numel()} values of {fqn} "
                    f"at offset {offsets}: it is incomplete"
                )
            items += reads
        return LoadPlan(items)

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raise AssertionError("only tensors are requested")

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        target = self.targets[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))]
        for dim, (start, length) in enumerate(
            zip(read_item.dest_offsets, read_item.lengths, strict=True)
        ):
            target = target.narrow(dim, start, length)
        return target

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        del read_item, tensor  # the data was copied into a view of the target


def load_tensors(
    checkpoint: Path, sharded: dict[str, Any], names: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Full tensors of the state-dict entries ``names`` from a torch_dist checkpoint
    saved at any TP/PP; only the stored chunks that overlap them are read.

    Each tensor is allocated whole and its ShardedTensors (a factory's too) are made
    views of it, so DCP's resharding reads fill it in place.
    """
    out: dict[str, torch.Tensor] = {}
    targets: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
    for name in names:
        meta = sharded[name]
        tensor = torch.empty(meta.data.shape, dtype=meta.data.dtype)
        for shard in _shards(_with_data(meta, tensor)):
            offsets, sizes = _chunk(shard)
            view = shard.data.view(sizes)
            if view.untyped_storage().data_ptr() != tensor.untyped_storage().data_ptr():
                raise AssertionError(f"{name}: a shard of it is not a view of the tensor")
            targets[(shard.key, tuple(offsets))] = view
        out[name] = tensor
    dcp_load({}, storage_reader=FileSystemReader(str(checkpoint)), planner=_ChunkLoadPlanner(targets))
    return out


class _Progress:
    """A tqdm bar on a terminal, else a log line every 10%."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.next_log = total, 0, 0.1
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="writing torch_dist", unit="tensor")

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.total and self.done / self.total >= self.next_log:
            log.info("wrote %d/%d tensors", self.done, self.total)
            self.next_log += 0.1

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
