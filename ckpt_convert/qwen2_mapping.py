"""The Qwen2 / Qwen2.5 weight mapping between Hugging Face and megarm (megatron-core).

One table, :data:`RULES`, is the whole mapping and both converters read it:
``hf2mcore`` applies each rule forwards, ``mcore2hf`` backwards. A rule names its
HF tensor(s) and its megatron-core tensor (for the local layer spec and for the
transformer-engine spec, whose layer norms live inside the fused linear layers)
and one transform kind:

``copy``
    the same tensor under another name;
``vocab-pad``
    the embedding; rows are zero-padded to the padded vocabulary on the way in and
    stripped on the way out;
``qkv-group``
    HF's separate ``q_proj``/``k_proj``/``v_proj`` (weights or biases) become one
    ``linear_qkv`` tensor grouped per query group (KV head), so a tensor-parallel
    shard of whole groups is a contiguous slice::

        W = cat([q.view(ng, nh//ng*d, H), k.view(ng, d, H), v.view(ng, d, H)], 1).reshape(-1, H)
        q, k, v = W.view(ng, nh//ng + 2, d, H).split([nh//ng, 1, 1], dim=1)

``fc1-cat``
    ``gate_proj`` and ``up_proj`` stacked into ``linear_fc1`` (``[gate; up]``).

``lm_head.weight`` is dropped (a reward model has no LM head); ``score.weight`` of
``Qwen2ForSequenceClassification`` is the value head. Names are full-model (TP=1,
PP=1) names; :mod:`megarm.model.sharding` cuts them into rank shards.

This module needs only torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

Spec = Literal["local", "te"]
Kind = Literal["copy", "vocab-pad", "qkv-group", "fc1-cat"]
Part = Literal["embedding", "layer", "final"]

_L = "model.layers.{i}."
_M = "decoder.layers.{i}."


@dataclass(frozen=True)
class Rule:
    """One line of the mapping table (``{i}`` stands for the layer number)."""

    hf: tuple[str, ...]
    """HF tensor name template(s), in the order the transform takes them."""
    local: str
    """megatron-core name template with megarm's local layer spec."""
    te: str
    """megatron-core name template with the transformer-engine layer spec."""
    kind: Kind
    """How the HF tensor(s) become the megatron-core tensor."""
    part: Part
    """Which pipeline stage holds it: the first (embedding), a layer's, or the last."""
    score: bool = False
    """Only present in ``Qwen2ForSequenceClassification`` (the value head)."""


RULES: tuple[Rule, ...] = (
    Rule(
        ("model.embed_tokens.weight",),
        "embedding.word_embeddings.weight",
        "embedding.word_embeddings.weight",
        "vocab-pad",
        "embedding",
    ),
    Rule(
        (_L + "input_layernorm.weight",),
        _M + "input_layernorm.weight",
        _M + "self_attention.linear_qkv.layer_norm_weight",
        "copy",
        "layer",
    ),
    Rule(
        tuple(_L + f"self_attn.{p}_proj.weight" for p in "qkv"),
        _M + "self_attention.linear_qkv.weight",
        _M + "self_attention.linear_qkv.weight",
        "qkv-group",
        "layer",
    ),
    Rule(
        tuple(_L + f"self_attn.{p}_proj.bias" for p in "qkv"),
        _M + "self_attention.linear_qkv.bias",
        _M + "self_attention.linear_qkv.bias",
        "qkv-group",
        "layer",
    ),
    Rule(
        (_L + "self_attn.o_proj.weight",),
        _M + "self_attention.linear_proj.weight",
        _M + "self_attention.linear_proj.weight",
        "copy",
        "layer",
    ),
    Rule(
        (_L + "post_attention_layernorm.weight",),
        _M + "pre_mlp_layernorm.weight",
        _M + "mlp.linear_fc1.layer_norm_weight",
        "copy",
        "layer",
    ),
    Rule(
        (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"),
        _M + "mlp.linear_fc1.weight",
        _M + "mlp.linear_fc1.weight",
        "fc1-cat",
        "layer",
    ),
    Rule(
        (_L + "mlp.down_proj.weight",),
        _M + "mlp.linear_fc2.weight",
        _M + "mlp.linear_fc2.weight",
        "copy",
        "layer",
    ),
    Rule(
        ("model.norm.weight",),
        "decoder.final_layernorm.weight",
        "decoder.final_layernorm.weight",
        "copy",
        "final",
    ),
    Rule(("score.weight",), "value_head.weight", "value_head.weight", "copy", "final", score=True),
)

# HF tensors a reward model deliberately leaves out: the LM head (0.5B-3B tie it to
# the embedding and have none) and RoPE buffers some old checkpoints saved.
DROPPED_HF = ("lm_head.weight",)
DROPPED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


class MappingError(ValueError):
    """An HF config or tensor does not fit the Qwen2 mapping; the message names it."""


# --------------------------------------------------------------------------- shape


@dataclass(frozen=True)
class Qwen2Shape:
    """The sizes the mapping needs (nh heads, ng KV groups, d head dim, H hidden)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    padded_vocab_size: int

    @property
    def heads_per_group(self) -> int:
        """Query heads per KV head (nh // ng)."""
        return self.num_attention_heads // self.num_query_groups

    @classmethod
    def from_megarm(cls, model: Any) -> Qwen2Shape:
        """From a :class:`megarm.config.ModelConfig`."""
        from megarm.config import head_dim, padded_vocab_size

        return cls(
            num_layers=model.num_layers,
            hidden_size=model.hidden_size,
            ffn_hidden_size=model.ffn_hidden_size,
            num_attention_heads=model.num_attention_heads,
            num_query_groups=model.num_query_groups,
            head_dim=head_dim(model),
            vocab_size=model.vocab_size,
            padded_vocab_size=padded_vocab_size(model),
        )


def rope_theta(hf: dict[str, Any], source: str = "config.json") -> float:
    """RoPE theta from an HF config: ``rope_theta`` (transformers 4) or
    ``rope_parameters.rope_theta`` (transformers 5). Scaled RoPE variants (YaRN,
    dynamic NTK) are refused: megarm implements plain RoPE only."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for table in (params, scaling):
        kind = table.get("rope_type", table.get("type", "default"))
        if kind not in ("default", None):
            raise MappingError(
                f"{source}: RoPE type {kind!r} is not supported (megarm implements plain RoPE); "
                "remove rope_scaling for a model trained without it"
            )
    theta = hf.get("rope_theta", params.get("rope_theta"))
    return float(theta) if theta is not None else 10000.0


def megarm_model_overrides(hf: dict[str, Any], source: str = "config.json") -> list[str]:
    """``model.*`` overrides for :func:`megarm.config.load_config` that give megarm the
    architecture an HF Qwen2 config.json describes (vocabulary unpadded)."""
    if hf.get("model_type") not in (None, "qwen2"):
        raise MappingError(
            f"{source}: model_type {hf.get('model_type')!r} is not Qwen2; megarm converts "
            "Qwen2 / Qwen2.5 checkpoints only"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise MappingError(f"{source}: hidden_act {hf['hidden_act']!r}; Qwen2 uses 'silu'")
    if hf.get("use_sliding_window"):
        raise MappingError(
            f"{source}: use_sliding_window is true; megarm attends over the whole sequence. "
            "Set it false if the model was trained without a window"
        )
    missing = [
        key
        for key in (
            "num_hidden_layers",
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "vocab_size",
        )
        if hf.get(key) is None
    ]
    if missing:
        raise MappingError(f"{source} lacks {', '.join(missing)}; is it a Qwen2 config.json?")
    heads = int(hf["num_attention_heads"])
    groups = int(hf.get("num_key_value_heads") or heads)
    if heads % groups:
        raise MappingError(
            f"{source}: {groups} KV heads do not divide {heads} attention heads; not a valid "
            "grouped-query attention config"
        )
    values: dict[str, Any] = {
        "num_layers": int(hf["num_hidden_layers"]),
        "hidden_size": int(hf["hidden_size"]),
        "ffn_hidden_size": int(hf["intermediate_size"]),
        "num_attention_heads": heads,
        # HF: no num_key_value_heads means one KV head per query head.
        "num_query_groups": groups,
        "vocab_size": int(hf["vocab_size"]),
        "max_position_embeddings": int(hf.get("max_position_embeddings") or 32768),
        "rotary_base": rope_theta(hf, source),
        "norm_epsilon": float(hf.get("rms_norm_eps") or 1e-6),
        "add_qkv_bias": True,  # HF's Qwen2 attention always has q/k/v biases
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }
    if hf.get("head_dim"):
        values["kv_channels"] = int(hf["head_dim"])
    return [f"model.{key}={_yaml(value)}" for key, value in values.items()]


def _yaml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


# --------------------------------------------------------------------------- entries


@dataclass(frozen=True)
class Entry:
    """A rule expanded for one layer: concrete names."""

    hf: tuple[str, ...]
    mcore: str
    kind: Kind
    part: Part
    layer: int | None


def entries(num_layers: int, with_score: bool, spec: Spec = "local") -> list[Entry]:
    """Every tensor of a full model, in model order (embedding, layers, final)."""
    out: list[Entry] = []
    for part in ("embedding", "layer", "final"):
        for layer in range(num_layers) if part == "layer" else [None]:
            for rule in RULES:
                if rule.part != part or (rule.score and not with_score):
                    continue
                fmt = {"i": layer} if layer is not None else {}
                template = rule.te if spec == "te" else rule.local
                out.append(
                    Entry(
                        hf=tuple(name.format(**fmt) for name in rule.hf),
                        mcore=template.format(**fmt),
                        kind=rule.kind,
                        part=part,
                        layer=layer,
                    )
                )
    return out


def is_dropped(hf_name: str) -> bool:
    """HF tensors a reward model leaves out on purpose."""
    return hf_name in DROPPED_HF or hf_name.endswith(DROPPED_HF_SUFFIXES)


def hf_shapes(shape: Qwen2Shape, with_score: bool) -> dict[str, tuple[int, ...]]:
    """The shape every HF tensor must have, by name."""
    s = shape
    q_rows = s.num_attention_heads * s.head_dim
    kv_rows = s.num_query_groups * s.head_dim
    per_layer = {
        "input_layernorm.weight": (s.hidden_size,),
        "post_attention_layernorm.weight": (s.hidden_size,),
        "self_attn.q_proj.weight": (q_rows, s.hidden_size),
        "self_attn.k_proj.weight": (kv_rows, s.hidden_size),
        "self_attn.v_proj.weight": (kv_rows, s.hidden_size),
        "self_attn.q_proj.bias": (q_rows,),
        "self_attn.k_proj.bias": (kv_rows,),
        "self_attn.v_proj.bias": (kv_rows,),
        "self_attn.o_proj.weight": (s.hidden_size, q_rows),
        "mlp.gate_proj.weight": (s.ffn_hidden_size, s.hidden_size),
        "mlp.up_proj.weight": (s.ffn_hidden_size, s.hidden_size),
        "mlp.down_proj.weight": (s.hidden_size, s.ffn_hidden_size),
    }
    out = {"model.embed_tokens.weight": (s.vocab_size, s.hidden_size)}
    for i in range(s.num_layers):
        out.update({f"model.layers.{i}.{key}": value for key, value in per_layer.items()})
    out["model.norm.weight"] = (s.hidden_size,)
    if with_score:
        out["score.weight"] = (1, s.hidden_size)
    return out


# --------------------------------------------------------------------------- transforms


def group_qkv(q: Tensor, k: Tensor, v: Tensor, shape: Qwen2Shape) -> Tensor:
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


def split_qkv(qkv: Tensor, shape: Qwen2Shape) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of :func:`group_qkv`: megatron's grouped QKV -> HF q, k, v (contiguous)."""
    ng, d, per = shape.num_query_groups, shape.head_dim, shape.heads_per_group
    trailing = tuple(qkv.shape[1:])
    q, k, v = qkv.reshape(ng, per + 2, d, *trailing).split([per, 1, 1], dim=1)
    return (
        q.reshape(ng * per * d, *trailing).contiguous(),
        k.reshape(ng * d, *trailing).contiguous(),
        v.reshape(ng * d, *trailing).contiguous(),
    )


def to_mcore(entry: Entry, tensors: list[Tensor], shape: Qwen2Shape) -> Tensor:
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


def to_hf(entry: Entry, tensor: Tensor, shape: Qwen2Shape) -> list[Tensor]:
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


def mcore_shape(entry: Entry, shape: Qwen2Shape) -> tuple[int, ...]:
    """The full (TP=1) megatron-core shape of ``entry``'s tensor."""
    hf = hf_shapes(shape, with_score=True)
    first = hf[entry.hf[0]]
    if entry.kind == "vocab-pad":
        return (shape.padded_vocab_size, shape.hidden_size)
    if entry.kind in ("qkv-group", "fc1-cat"):
        return (sum(hf[name][0] for name in entry.hf), *first[1:])
    return first


# --------------------------------------------------------------------------- drivers


def hf_to_mcore(
    read: Callable[[str], Tensor],
    shape: Qwen2Shape,
    selected: list[Entry],
    dtype: torch.dtype | None = None,
    where: Callable[[str], str] = lambda name: name,
) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(mcore name, tensor)`` for ``selected`` entries, reading HF tensors one
    entry at a time through ``read`` (so callers can stream from disk).

    Every HF tensor's shape is checked first; ``where(name)`` says in the error which
    file held it. ``dtype`` casts the result (HF bf16 -> fp32 is exact).
    """
    expected = hf_shapes(shape, with_score=True)
    for entry in selected:
        tensors = []
        for name in entry.hf:
            tensor = read(name)
            if tuple(tensor.shape) != expected[name]:
                raise MappingError(
                    f"{where(name)}: {name} has shape {tuple(tensor.shape)}, the config.json "
                    f"implies {expected[name]}; the weights and config.json disagree"
                )
            tensors.append(tensor)
        out = to_mcore(entry, tensors, shape)
        yield entry.mcore, out if dtype is None else out.to(dtype)


def mcore_to_hf(
    read: Callable[[str], Tensor], shape: Qwen2Shape, selected: list[Entry]
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


def divisors(n: int) -> list[int]:
    """Positive divisors of ``n``."""
    return [d for d in range(1, n + 1) if n % d == 0]


def layout_problems(shape: Qwen2Shape, tp: int, pp: int) -> list[str]:
    """Why a TP/PP layout cannot hold this model (empty when it can), with the sizes
    that would work."""
    problems = []
    nh, ng = shape.num_attention_heads, shape.num_query_groups
    tp_ok = [t for t in divisors(math.gcd(nh, ng)) if shape.ffn_hidden_size % t == 0]
    if tp < 1 or nh % tp or ng % tp or shape.ffn_hidden_size % tp:
        problems.append(
            f"tensor-parallel size {tp} must divide the {ng} KV heads and {nh} attention heads "
            f"(each TP rank holds whole query groups) and the FFN size {shape.ffn_hidden_size}; "
            f"allowed: {', '.join(map(str, tp_ok))}"
        )
    elif shape.padded_vocab_size % tp:
        problems.append(
            f"tensor-parallel size {tp} must divide the padded vocabulary "
            f"{shape.padded_vocab_size}; raise --make-vocab-size-divisible-by to a multiple of {tp}"
        )
    if pp < 1 or shape.num_layers % pp:
        problems.append(
            f"pipeline-parallel size {pp} must divide the {shape.num_layers} layers; allowed: "
            f"{', '.join(map(str, divisors(shape.num_layers)))}"
        )
    return problems
