"""The optimizer's part of a checkpoint, written without gathering it.

megarm stores the distributed optimizer in megatron-core's ``fully_reshardable``
layout: for every parameter, ``optimizer.state.{param,exp_avg,exp_avg_sq}.<key>``
tensors shaped and sharded like the parameter itself, so a run resumes at any
TP/PP/DP (megatron-core's own loader reads them). megatron-core produces that
layout by all-gathering three fp32 buffers of the whole DP-local shard on every
rank (12 bytes per parameter of host memory, at every save).

Each data-parallel rank, though, holds a contiguous flat range of every parameter
it owns. A flat range of a row-major tensor is a union of at most a few boxes
(a partial first row, whole rows, a partial last row, recursively), and DCP lets a
tensor be stored as any set of chunks. So every DP rank writes its own boxes,
straight from its optimizer state: no gather, no copy, the same files on disk.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory, is_main_replica

from megarm.checkpoint.writer import Item, shards_of, tensor_item

SHARDING_TYPE = "fully_reshardable"
STATE_KEYS = ("param", "exp_avg", "exp_avg_sq")


def flat_range_boxes(
    start: int, stop: int, shape: tuple[int, ...]
) -> Iterator[tuple[tuple[int, ...], tuple[int, ...], int]]:
    """Boxes ``(offsets, sizes, flat_start)`` of a row-major tensor of ``shape`` that
    together are exactly its flat elements ``[start, stop)``, in order."""
    if start >= stop:
        return
    if len(shape) <= 1:
        yield (start,), (stop - start,), start
        return
    inner = math.prod(shape[1:])
    first, last = start // inner, (stop - 1) // inner
    if first == last or start % inner:
        # A partial leading row (or everything within one row): recurse into it.
        row_stop = min(stop, (first + 1) * inner)
        for offsets, sizes, flat in flat_range_boxes(start - first * inner, row_stop - first * inner, shape[1:]):
            yield (first, *offsets), (1, *sizes), flat + first * inner
        start = row_stop
        first += 1
        if start >= stop:
            return
    full_rows = (stop - start) // inner
    if full_rows:
        yield (first, *(0,) * (len(shape) - 1)), (full_rows, *shape[1:]), start
        start += full_rows * inner
    if start < stop:
        row = start // inner
        for offsets, sizes, flat in flat_range_boxes(0, stop - start, shape[1:]):
            yield (row, *offsets), (1, *sizes), flat + start


def _param_metadata(model_sharded: dict[str, Any]) -> dict[int, Any]:
    """Model ShardedTensor (or factory) by the identity of the parameter it holds."""
    out: dict[int, Any] = {}
    stack = [model_sharded]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list | tuple):
            stack.extend(value)
        elif hasattr(value, "data") and hasattr(value, "key"):
            out[id(value.data)] = value
    return out


def _dp_main_replica(replica_id: Any) -> bool:
    """Main replica once data parallelism is set aside (every DP rank writes its own
    part); tensor/pipeline replicas (e.g. a replicated norm) still write once."""
    if isinstance(replica_id, tuple) and replica_id:
        return is_main_replica((*replica_id[:-1], 0))
    return is_main_replica(replica_id)


def distributed_param_items(optimizer: Any, model_sharded: dict[str, Any], prefix: str = "") -> list[Item]:
    """This rank's boxes of ``optimizer.state.{param,exp_avg,exp_avg_sq}.<key>`` for a
    megatron-core DistributedOptimizer (the layout of ``fully_reshardable``)."""
    by_param = _param_metadata(model_sharded)
    items: list[Item] = []
    for gbuf_ranges in optimizer.gbuf_ranges:
        for per_bucket in gbuf_ranges.values():
            for bucket in per_bucket:
                for model_param, ranges in bucket["param_map"].items():
                    meta = by_param.get(id(model_param))
                    if meta is None:
                        raise KeyError(
                            f"a parameter of shape {tuple(model_param.shape)} is not in the "
                            "model's sharded state dict"
                        )
                    owned = ranges["param"]
                    if owned.size == 0:
                        continue
                    state = optimizer._get_main_param_and_optimizer_states(model_param)
                    items += _boxes(meta, model_param, owned.start, owned.end, state, prefix)
    return items


def _boxes(meta: Any, param: torch.Tensor, start: int, stop: int, state: dict, prefix: str) -> list[Item]:
    """Items for the flat range ``[start, stop)`` of ``param`` that this rank owns."""
    # Which flat elements of the parameter each saved ShardedTensor holds: build the
    # entry (a factory splits fc1 into gate/up) over an index tensor.
    index = torch.arange(param.numel()).view(param.shape)
    if isinstance(meta, ShardedTensorFactory):
        built = shards_of(replace(meta, data=index))
    else:
        built = [replace(meta, data=index, dtype=index.dtype)]
    items: list[Item] = []
    for shard in built:
        if not _dp_main_replica(shard.replica_id):
            continue
        held = shard.data
        if not held.is_contiguous():
            raise NotImplementedError(f"{shard.key}: a non-contiguous part of a parameter")
        first = held.storage_offset() - index.storage_offset()
        lo, hi = max(start, first), min(stop, first + held.numel())
        if lo >= hi:
            continue
        shape = tuple(shard.local_shape)
        pre = shard.prepend_axis_num
        for offsets, sizes, flat in flat_range_boxes(lo - first, hi - first, shape):
            begin = first + flat - start  # position in the rank's 1-D optimizer state
            for key in STATE_KEYS:
                values = state[key]
                items.append(
                    tensor_item(
                        f"{prefix}optimizer.state.{key}.{shard.key}",
                        tuple(shard.global_shape),
                        tuple(g + o for g, o in zip(shard.global_offset, (0,) * pre + offsets, strict=True)),
                        (1,) * pre + sizes,
                        values.dtype,
                        lambda v=values, b=begin, n=math.prod(sizes), s=(1,) * pre + sizes: v.detach()[b : b + n].view(s),
                    )
                )
    return items


def optimizer_state_for_save(optimizer: Any, model_sharded: dict[str, Any]) -> tuple[Any, list[Item]]:
    """The optimizer's checkpoint entries: ``(nested state, extra items)``. For the
    distributed optimizer the parameter state comes as items of this module (no
    gather); otherwise megatron-core's own sharded state dict (model-space tensors,
    no gather either) is returned whole and ``items`` is empty."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = list(getattr(optimizer, "chained_optimizers", [optimizer]))
    if not any(isinstance(o, DistributedOptimizer) for o in inner):
        return optimizer.sharded_state_dict(model_sharded, metadata={"distrib_optim_sharding_type": SHARDING_TYPE}), []
    if not all(isinstance(o, DistributedOptimizer) for o in inner):
        raise NotImplementedError("a chain of distributed and non-distributed optimizers")
    states, items = [], []
    for position, sub in enumerate(inner):
        # megatron-core prefixes chained optimizers' keys unless told not to.
        prefix = f"chained_{position}." if len(inner) > 1 else ""
        state = sub.state_dict()  # param groups, step: plain data for common.pt
        state["param_state_sharding_type"] = SHARDING_TYPE
        states.append(state)
        items += distributed_param_items(sub, model_sharded, prefix)
    nested = states[0] if len(states) == 1 else dict(enumerate(states))
    return nested, items
