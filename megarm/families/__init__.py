"""The model families megarm trains, converts and exports, as data.

- :mod:`megarm.families.base`: what a family description is (config keys both ways,
  weight rules with their tensor-parallel split, refusals);
- :mod:`megarm.families.common`: the lines the dense families share;
- :mod:`megarm.families.qwen2`, :mod:`~megarm.families.qwen3`,
  :mod:`~megarm.families.llama`: one description each; their mixture-of-experts
  siblings :mod:`~megarm.families.qwen3_moe` and :mod:`~megarm.families.qwen2_moe`.

Adding a family is adding one description here (and its numeric test); the config
reader, the converters, the sharding of full state dicts and the export all read
:data:`FAMILIES`. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import Any

from megarm.families.base import Entry, Family, FamilyError, Read, Shape, WeightRule
from megarm.families.llama import LLAMA
from megarm.families.qwen2 import QWEN2
from megarm.families.qwen2_moe import QWEN2_MOE
from megarm.families.qwen3 import QWEN3
from megarm.families.qwen3_moe import QWEN3_MOE

__all__ = [
    "FAMILIES",
    "Entry",
    "Family",
    "FamilyError",
    "Read",
    "Shape",
    "WeightRule",
    "detect",
    "expert_of",
    "family",
    "head_weight",
    "megatron_rule",
    "te_names",
]

FAMILIES: dict[str, Family] = {f.name: f for f in (QWEN2, QWEN3, LLAMA, QWEN3_MOE, QWEN2_MOE)}

# Known HF model types megarm cannot represent.
_REFUSED_TYPES = {
    "deepseek_v2": "multi-head latent attention (MLA) with DeepSeek-style experts (n_routed_experts)",
    "deepseek_v3": "multi-head latent attention (MLA) with DeepSeek-style experts (n_routed_experts)",
    "mixtral": "a mixture-of-experts model with sliding-window attention",
    "llama4": "a mixture-of-experts, multimodal model",
    "mistral": "a sliding-window attention model",
}


def family(name: str) -> Family:
    """The family called ``name`` (``model.family``)."""
    return FAMILIES[name]


def _by_architecture(arch: str) -> Family | None:
    return next((f for f in FAMILIES.values() if arch in f.architectures), None)


def detect(hf: Mapping[str, Any], source: str = "config.json") -> Family:
    """The family of the model an HF config.json describes, from its ``model_type``
    and ``architectures``; :class:`FamilyError` naming an unknown or refused model
    type or architecture, or the two disagreeing. A config naming neither is taken
    as Qwen2 (the only family of megarm's first checkpoints)."""
    known = ", ".join(f.model_type for f in FAMILIES.values())
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else None
    by_type = next((f for f in FAMILIES.values() if f.model_type == model_type), None)
    if model_type is not None and by_type is None:
        what = _REFUSED_TYPES.get(str(model_type))
        why = f": {what}; megarm trains {known}" if what else f"; megarm knows {known}"
        raise FamilyError(f"{source}: model_type {model_type!r} is not supported{why}")
    by_arch = _by_architecture(arch) if arch is not None else None
    if arch is not None and by_arch is None:
        accepted = ", ".join(a for f in FAMILIES.values() for a in f.architectures)
        raise FamilyError(
            f"{source}: architecture {arch!r} is not supported; megarm converts {accepted}"
        )
    if by_type is not None and by_arch is not None and by_type is not by_arch:
        raise FamilyError(
            f"{source}: architecture {arch!r} is a {by_arch.model_type} model but model_type "
            f"is {model_type!r}; fix one of them"
        )
    return by_type or by_arch or QWEN2


@cache
def _rules() -> list[tuple[Family, WeightRule]]:
    return [(f, rule) for f in FAMILIES.values() for rule in f.weights]


def megatron_rule(name: str) -> WeightRule:
    """The weight rule of a full-model megatron-core parameter name (any family,
    either layer spec); ``KeyError`` for a name no family has. A name's rule is the
    same in every family that has it (a test checks)."""
    for fam in FAMILIES.values():
        rule = fam.rule_of(name)
        if rule is not None:
            return rule
    raise KeyError(f"no family has a parameter called {name!r}")


def expert_of(name: str) -> tuple[int, int, int] | None:
    """``(expert, start, end)`` of a full-model megatron-core name of a routed
    expert's tensor, any family (``name[start:end]`` is the expert number), else
    ``None``."""
    for fam in FAMILIES.values():
        if fam.moe and (found := fam.expert_of(name)) is not None:
            return found
    return None


def head_weight(head: str) -> str:
    """The megatron-core name of an output head's weight (``value``: the value head;
    ``lm``: the LM output layer), the same in every family."""
    (name,) = {rule.local for _, rule in _rules() if rule.head == head}
    return name


@cache
def te_names() -> dict[str, str]:
    """Layer-relative local-spec names -> transformer-engine names, where they differ
    (TE fuses the layer norms into the next linear layer)."""
    prefix = "decoder.layers.{i}."
    return {
        rule.local.removeprefix(prefix): rule.te_name.removeprefix(prefix)
        for _, rule in _rules()
        if rule.te and rule.local.startswith(prefix)
    }
