"""Cut a full (TP=1, PP=1) megarm state dict into one rank's tensor/pipeline shard.

How tensor parallelism splits each parameter, and which pipeline stage holds it, is
data in the model families' weight tables (:class:`megarm.families.WeightRule`
``tp`` and ``part``). Megatron-core's own ``dist_checkpointing`` does the same for
torch_dist checkpoints; this serves the legacy ``mp_rank_XX`` format, loading a
full state dict into any layout, and tests that place known weights on every
layout.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from megatron.core import parallel_state as ps

from megarm.families import expert_of, head_weight, megatron_rule, te_names

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")

# megatron-core's local layer spec names -> transformer-engine spec names (TE fuses
# the layer norms into the following linear layer), from the families' tables.
TE_NAMES = te_names()


def tp_rule(name: str) -> int | str | None:
    """The TP split of a full-model parameter name: dim 0 / dim 1 / ``fc1`` (gate and
    up halves each split on dim 0) / ``None`` (replicated); KeyError for a name no
    family has."""
    return megatron_rule(name).tp


def split_tp(name: str, tensor: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's slice of a full tensor."""
    rule = tp_rule(name)
    if rule is None or tp_size == 1:
        return tensor
    if rule == "fc1":
        gate, up = tensor.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]], 0)
    if tensor.shape[rule] % tp_size:
        raise ValueError(f"{name}: dim {rule} of {tuple(tensor.shape)} not divisible by TP={tp_size}")
    return tensor.chunk(tp_size, dim=rule)[tp_rank]


def chunk_layers(
    num_layers: int, pp_rank: int, pp_size: int, vp_stage: int | None = None, vp_size: int | None = None
) -> range:
    """Global layer numbers held by one pipeline rank / virtual chunk (megatron's layout)."""
    chunks = pp_size * (vp_size or 1)
    per_chunk = num_layers // chunks
    index = (vp_stage or 0) * pp_size + pp_rank
    return range(index * per_chunk, (index + 1) * per_chunk)


def shard_state_dict(
    full: dict[str, torch.Tensor],
    num_layers: int,
    tp_rank: int = 0,
    tp_size: int = 1,
    pp_rank: int = 0,
    pp_size: int = 1,
    vp_stage: int | None = None,
    vp_size: int | None = None,
    ep_rank: int = 0,
    ep_size: int = 1,
    num_experts: int = 0,
) -> dict[str, torch.Tensor]:
    """One rank's (and chunk's) state dict, with layers renumbered from 0 and, with
    expert parallelism, this EP rank's ``num_experts / ep_size`` routed experts
    renumbered from 0 (megatron-core's SequentialMLP numbers its local experts)."""
    layers = chunk_layers(num_layers, pp_rank, pp_size, vp_stage, vp_size)
    per_rank = num_experts // ep_size if num_experts else 0
    first = layers.start == 0
    last = layers.stop == num_layers
    out: dict[str, torch.Tensor] = {}
    for name, tensor in full.items():
        try:
            part = megatron_rule(name).part
        except KeyError:
            raise KeyError(f"unexpected parameter {name!r} in a reward-model state dict") from None
        if part == "layer":
            index, rest = _LAYER.match(name).groups()  # type: ignore[union-attr]
            if int(index) not in layers:
                continue
            name_here = f"decoder.layers.{int(index) - layers.start}.{rest}"
        elif (part == "embedding" and not first) or (part == "final" and not last):
            continue
        else:
            name_here = name
        if ep_size > 1 and (expert := expert_of(name_here)) is not None:
            number, start, end = expert
            local = number - ep_rank * per_rank
            if not 0 <= local < per_rank:
                continue
            name_here = f"{name_here[:start]}{local}{name_here[end:]}"
        out[name_here] = split_tp(name, tensor, tp_rank, tp_size).clone()
    return out


class StateDictMismatchError(ValueError):
    """A state dict does not fit the model (names missing or unexpected)."""


def load_state_dict_strict(module: torch.nn.Module, state: dict[str, Any]) -> None:
    """``module.load_state_dict`` that is strict about weights but not about
    ``_extra_state`` entries: transformer-engine modules have extra state (FP8
    metadata) that megatron-core's sharded state dict leaves out, so a checkpoint
    never holds it and the module keeps its own."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise StateDictMismatchError(
            "the checkpoint does not fit the model: "
            + (f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''} " if missing else "")
            + (f"unexpected {unexpected[:3]}" if unexpected else "")
        )


def spec_names(state: dict[str, torch.Tensor], wanted: set[str]) -> dict[str, torch.Tensor]:
    """``state`` with local-spec layer-norm names renamed to TE's (or back) where
    the module (its state-dict names ``wanted``) uses the other spelling."""
    out = {}
    for name, tensor in state.items():
        if name not in wanted:
            for local, te in TE_NAMES.items():
                if name.endswith(local) and name[: -len(local)] + te in wanted:
                    name = name[: -len(local)] + te
                elif name.endswith(te) and name[: -len(te)] + local in wanted:
                    name = name[: -len(te)] + local
        out[name] = tensor
    return out


def load_full_state_dict(chunks: list[torch.nn.Module], full: dict[str, torch.Tensor], cfg) -> None:
    """Load a full (TP=1, PP=1) state dict into this rank's model chunks, cutting it
    for this rank's place in megatron-core's parallel groups (``cfg``: MegarmConfig).
    Layer-norm names of either layer spec are accepted; ``_extra_state`` entries
    (transformer-engine) are the module's own."""
    p = cfg.parallel
    vpp = p.virtual_pipeline_model_parallel_size
    for vp, chunk in enumerate(chunks):
        module = getattr(chunk, "module", chunk)
        shard = shard_state_dict(
            full,
            cfg.model.num_layers,
            ps.get_tensor_model_parallel_rank(),
            p.tensor_model_parallel_size,
            ps.get_pipeline_model_parallel_rank(),
            p.pipeline_model_parallel_size,
            vp if vpp else None,
            vpp,
            ps.get_expert_model_parallel_rank(),
            p.expert_model_parallel_size,
            cfg.model.num_moe_experts or 0,
        )
        wanted = set(module.state_dict())
        output = head_weight("lm")
        if output in wanted and output not in shard:
            # An output layer tied to the embedding on a later pipeline stage: its copy.
            (tied,) = [name for name in full if megatron_rule(name).part == "embedding"]
            shard[output] = split_tp(
                tied, full[tied], ps.get_tensor_model_parallel_rank(), p.tensor_model_parallel_size
            ).clone()
        load_state_dict_strict(module, spec_names(shard, wanted))
