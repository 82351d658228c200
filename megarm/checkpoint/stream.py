"""Read and write megarm's torch_dist checkpoints one model tensor at a time, in a
single process, for the converters (which never hold the whole model).

Both directions work from the model's *sharded state dict built on the meta
device* (every checkpoint key, global shape and offset the trainer uses, without a
byte of weights):

- :func:`save_streaming` writes each tensor through :mod:`megarm.checkpoint.writer`
  when DCP reaches it, asking the caller to make it (``produce(name)``), and frees
  it before the next: peak memory is one model tensor plus what the caller needs to
  make it. The checkpoint gets megarm's integrity manifest.
- :func:`load_tensors` reads a chosen subset of state-dict names with a DCP load
  planner whose targets are the chunks a TP=1, PP=1 model would hold: DCP's own
  resharding picks the overlapping stored chunks, so any saved TP/PP works, and
  nothing outside the requested layers is read. (megatron-core's ``load`` cannot be
  asked for some layers of a stacked tensor in one process.) Callers verify the
  checkpoint first (:func:`megarm.checkpoint.open_checkpoint`).
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from megatron.core.dist_checkpointing.mapping import (
    ShardedObject,
    ShardedTensor,
    ShardedTensorFactory,
    is_main_replica,
)
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megarm.checkpoint.integrity import describe_files, write_manifest
from megarm.checkpoint.writer import (
    Item,
    chunk_of,
    object_item,
    shards_of,
    tensor_item,
    write_common,
    write_dcp,
)

log = logging.getLogger("megarm.checkpoint")

Produce = Callable[[str], torch.Tensor]


def _with_data(value: Any, data: torch.Tensor) -> Any:
    """``value`` (a ShardedTensor or factory) holding ``data`` instead of its meta tensor."""
    if isinstance(value, ShardedTensorFactory):
        return replace(value, data=data)
    return replace(value, data=data.view(value.local_shape))


def save_streaming(
    out: Path,
    sharded: dict[str, Any],
    produce: Produce,
    order: Sequence[str],
    common: dict[str, Any],
) -> int:
    """Write a torch_dist checkpoint into the existing, empty directory ``out``.

    ``sharded`` is a (meta) sharded state dict from :func:`megarm.model.builder.meta_sharded_state_dict`;
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
    cache: dict[str, list[ShardedTensor]] = {}
    progress = _Progress(sum(len(shards_of(tensors[n])) for n in order))

    def made(name: str, position: int) -> torch.Tensor:
        if name not in cache:
            cache.clear()  # one entry's tensor alive at a time (a factory has several chunks)
            meta = tensors[name]
            data = produce(name)
            if tuple(data.shape) != tuple(meta.data.shape) or data.dtype != meta.data.dtype:
                raise ValueError(
                    f"{name}: made {tuple(data.shape)} {data.dtype}, the model has "
                    f"{tuple(meta.data.shape)} {meta.data.dtype}"
                )
            cache[name] = shards_of(_with_data(meta, data.contiguous()))
        shard = cache[name][position]
        return shard.data.reshape(chunk_of(shard)[1])

    items: list[Item] = [
        object_item(obj.unique_key, [obj.data]) for obj in objects if is_main_replica(obj.replica_id)
    ]
    total = 0
    for name in order:
        for position, shard in enumerate(shards_of(tensors[name])):
            if not is_main_replica(shard.replica_id):
                continue
            offsets, sizes = chunk_of(shard)
            items.append(
                tensor_item(
                    shard.key, tuple(shard.global_shape), offsets, sizes, shard.dtype,
                    lambda name=name, position=position: made(name, position),
                )
            )
            total += math.prod(sizes) * shard.dtype.itemsize
    files = write_dcp(out, items, progress=progress.update)
    progress.close()
    cache.clear()
    files.update(describe_files(out, [*write_common(out, common), ".metadata"]))
    write_manifest(out, files)
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

    def load_bytes(self, read_item: ReadItem, value: Any) -> None:
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


class _SafeReader(FileSystemReader):
    """DCP's reader with the restricted ``.metadata`` unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        from megarm.checkpoint.integrity import read_dcp_metadata

        metadata = read_dcp_metadata(Path(self.path))
        metadata.storage_meta = None
        return metadata


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
        for shard in shards_of(_with_data(meta, tensor)):
            offsets, sizes = chunk_of(shard)
            view = shard.data.view(sizes)
            if view.untyped_storage().data_ptr() != tensor.untyped_storage().data_ptr():
                raise AssertionError(f"{name}: a shard of it is not a view of the tensor")
            targets[(shard.key, tuple(offsets))] = view
        out[name] = tensor
    dcp_load({}, storage_reader=_SafeReader(str(checkpoint)), planner=_ChunkLoadPlanner(targets))
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
