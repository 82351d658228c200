"""The tensor side of the families' weight tables: each rule's transform, both ways.

The tables themselves (names, shapes, transform kind, TP split) are data in
:mod:`megarm.families`; both converters read them through this module:
``hf2mcore`` applies each rule forwards, ``mcore2hf`` backwards. The transforms:

``copy``
    the same tensor under another name;
``vocab-pad``
    the embedding; rows are zero-padded to the padded vocabulary on the way in and
    stripped on the way out;
``qkv-group``
    HF's separate ``q``/``k``/``v`` projections (weights or biases) become one fused
    tensor grouped per query group (KV head), so a tensor-parallel shard of whole
    groups is a contiguous slice::

        W = cat([q.view(ng, nh//ng*d, H), k.view(ng, d, H), v.view(ng, d, H)], 1).reshape(-1, H)
        q, k, v = W.view(ng, nh//ng + 2, d, H).split([nh//ng, 1, 1], dim=1)

``fc1-cat``
    the gate and up projections stacked into one tensor (``[gate; up]``).

Names are full-model (TP=1, PP=1) names; :mod:`megarm.model.sharding` cuts them
into rank shards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from megarm.families import Entry, Family, Shape


class MappingError(ValueError):
    """A tensor does not fit the family's weight table; the message names it."""


def value_head_name(family: Family) -> str:
    """The megatron-core name of the value head."""
    return family.head_rule("value").local


# --------------------------------------------------------------------------- transforms


def group_qkv(q: Tensor, k: Tensor, v: Tensor, shape: Shape) -> Tensor:
    """HF q/k/v (weights ``[rows, H]`` or biases ``[rows]``) -> megatron's grouped QKV."""
    ng, d = shape.num_query_groups, shape.head_dim
    trailing = tuple(q.shape[1:])
    grouped = torch.cat(
        [
            q.reshape(ng, shape.heads_per_group * d, *trailing),
            k.reshape(ng, d, *trailing),
            v.reshape(ng, d, *trailing),
        ],
        dim=1,
    )
    return grouped.reshape(-1, *trailing)


def split_qkv(qkv: Tensor, shape: Shape) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of :func:`group_qkv`: megatron's grouped QKV -> HF q, k, v (contiguous)."""
    ng, d, per = shape.num_query_groups, shape.head_dim, shape.heads_per_group
    trailing = tuple(qkv.shape[1:])
    q, k, v = qkv.reshape(ng, per + 2, d, *trailing).split([per, 1, 1], dim=1)
    return (
        q.reshape(ng * per * d, *trailing).contiguous(),
        k.reshape(ng * d, *trailing).contiguous(),
        v.reshape(ng * d, *trailing).contiguous(),
    )


def to_mcore(entry: Entry, tensors: list[Tensor], shape: Shape) -> Tensor:
    """Apply ``entry``'s transform HF -> megatron-core."""
    if entry.kind == "copy":
        return tensors[0]
    if entry.kind == "vocab-pad":
        (emb,) = tensors
        extra = shape.padded_vocab_size - emb.shape[0]
        if extra == 0:
            return emb
        # Zero rows: token ids past the real vocabulary never occur in the data.
        return torch.cat([emb, emb.new_zeros(extra, emb.shape[1])], dim=0)
    if entry.kind == "qkv-group":
        return group_qkv(*tensors, shape)
    if entry.kind == "fc1-cat":
        return torch.cat(tensors, dim=0)
    raise AssertionError(f"unknown transform kind {entry.kind!r}")


def to_hf(entry: Entry, tensor: Tensor, shape: Shape) -> list[Tensor]:
    """Apply ``entry``'s transform megatron-core -> HF (one tensor per HF name)."""
    if entry.kind == "copy":
        return [tensor]
    if entry.kind == "vocab-pad":
        return [tensor[: shape.vocab_size]]
    if entry.kind == "qkv-group":
        return list(split_qkv(tensor, shape))
    if entry.kind == "fc1-cat":
        return list(tensor.chunk(2, dim=0))
    raise AssertionError(f"unknown transform kind {entry.kind!r}")


def hf_shapes_of(entry: Entry, shape: Shape) -> list[tuple[int, ...]]:
    """The shape each of ``entry``'s HF tensors must have."""
    return [tuple(shape.size(s) for s in symbols) for symbols in entry.rule.shapes]


def mcore_shape(entry: Entry, shape: Shape) -> tuple[int, ...]:
    """The full (TP=1) megatron-core shape of ``entry``'s tensor."""
    first, *rest = hf_shapes_of(entry, shape)
    if entry.kind == "vocab-pad":
        return (shape.padded_vocab_size, *first[1:])
    if entry.kind in ("qkv-group", "fc1-cat"):
        return (first[0] + sum(s[0] for s in rest), *first[1:])
    return first


# --------------------------------------------------------------------------- drivers


def hf_to_mcore(
    read: Callable[[str], Tensor],
    shape: Shape,
    selected: list[Entry],
    dtype: torch.dtype | None = None,
    where: Callable[[str], str] = lambda name: name,
) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(mcore name, tensor)`` for ``selected`` entries, reading HF tensors one
    entry at a time through ``read`` (so callers can stream from disk).

    Every HF tensor's shape is checked first; ``where(name)`` says in the error which
    file held it. ``dtype`` casts the result (HF bf16 -> fp32 is exact).
    """
    for entry in selected:
        tensors = []
        for name, expected in zip(entry.hf, hf_shapes_of(entry, shape), strict=True):
            tensor = read(name)
            if tuple(tensor.shape) != expected:
                raise MappingError(
                    f"{where(name)}: {name} has shape {tuple(tensor.shape)}, the config.json "
                    f"implies {expected}; the weights and config.json disagree"
                )
            tensors.append(tensor)
        out = to_mcore(entry, tensors, shape)
        yield entry.mcore, out if dtype is None else out.to(dtype)


def mcore_to_hf(
    read: Callable[[str], Tensor], shape: Shape, selected: list[Entry]
) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(HF name, tensor)`` for ``selected`` entries (contiguous tensors)."""
    for entry in selected:
        tensor = read(entry.mcore)
        if tuple(tensor.shape) != mcore_shape(entry, shape):
            raise MappingError(
                f"{entry.mcore} has shape {tuple(tensor.shape)}, the model config implies "
                f"{mcore_shape(entry, shape)}"
            )
        for name, value in zip(entry.hf, to_hf(entry, tensor, shape), strict=True):
            yield name, value.contiguous()
