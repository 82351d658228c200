"""What a model family is: one data description that megarm and the converters read.

A :class:`Family` holds everything megarm knows about one Hugging Face model family
and nothing else does (a test walks the sources and checks it):

- the HF architecture names and ``model_type`` it accepts and writes;
- its config.json keys, as one list of :class:`ConfigKey` pairs (HF key <-> megarm
  ``ModelConfig`` field) read in one direction for ``model.hf_config`` and
  ``hf2mcore`` and in the other for the export's config.json, never written twice;
- the megarm fields the family fixes (QKV bias, QK-norm) and the HF values it
  implies (``hidden_act``), with the RoPE variants it can express;
- its weights, as :class:`WeightRule` lines: HF tensor name(s) and shapes, the
  megatron-core name (local and transformer-engine layer spec), the transform
  between them and how tensor parallelism splits the megatron-core tensor;
- what is refused, and why (:class:`Refusal`), before any weight is read.

This module and the family tables import no torch: ``python -m megarm.config``
reads HF configs through them. Tensor transforms live with the converters
(:mod:`ckpt_convert.mapping`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal, NamedTuple

Kind = Literal["copy", "vocab-pad", "qkv-group", "fc1-cat"]
Part = Literal["embedding", "layer", "final"]
Split = Literal[0, 1, "fc1"] | None
Spec = Literal["local", "te"]

_MISSING = object()


class FamilyError(ValueError):
    """An HF config megarm cannot represent; the message names the key and why."""


# --------------------------------------------------------------------------- config keys


@dataclass(frozen=True)
class ConfigKey:
    """One HF config.json key <-> one megarm ``ModelConfig`` field, both directions.

    ``hf`` is the key as transformers 4 writes it; a dotted name is a key of a
    nested object (``rope_scaling.factor``). ``also`` lists other spellings read
    (transformers 5 keeps RoPE settings under ``rope_parameters``); the export
    writes ``hf`` (transformers' own config class then files it where its version
    keeps it).
    """

    hf: str
    """The HF key (dotted for a nested object)."""
    field: str
    """The megarm ``ModelConfig`` field."""
    default: Any = _MISSING
    """What HF assumes when the key is absent; ``_MISSING``: the key is required;
    ``None``: absent means megarm derives the value (e.g. ``head_dim``)."""
    also: tuple[str, ...] = ()
    """Other spellings of the same key, read when ``hf`` is absent."""
    values: Mapping[Any, Any] | None = None
    """HF value -> megarm value, for keys whose values are names (RoPE type); a value
    outside it is refused, naming the values megarm can represent."""
    what: str = ""
    """How errors name the key's values (``RoPE type``)."""
    when: str | None = None
    """Only read and written when this megarm field is true (the RoPE scaling
    parameters exist only with RoPE scaling); then required."""
    same_as: str | None = None
    """Absent in HF: take the value of this other HF key (``num_key_value_heads``
    defaults to ``num_attention_heads``)."""

    def lookup(self, hf: Mapping[str, Any]) -> tuple[str, Any]:
        """(spelling found, value) in ``hf``; (``hf``, ``_MISSING``) when absent."""
        for name in (self.hf, *self.also):
            value = _get(hf, name)
            if value is not None:
                return name, value
        return self.hf, _MISSING


def _get(hf: Mapping[str, Any], dotted: str) -> Any:
    node: Any = hf
    for part in dotted.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return node


def _put(out: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = out
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


# --------------------------------------------------------------------------- refusals


@dataclass(frozen=True)
class Refusal:
    """An HF config value megarm cannot represent, with the reason given to the user."""

    key: str
    """The HF key looked at (dotted for a nested object)."""
    applies: Callable[[Any], bool]
    """True for the (present) values that are refused."""
    reason: str
    """Why, and what to do; ``{value}`` is replaced by the value found."""


# --------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class WeightRule:
    """One line of a family's weight table. ``{i}`` stands for the layer number in
    layer rules and ``{e}`` for the expert number in a mixture-of-experts layer's
    expert rules (one line per expert); names are full-model (TP=1, PP=1, EP=1)
    names."""

    hf: tuple[str, ...]
    """HF tensor name template(s), in the order the transform takes them."""
    shapes: tuple[tuple[str, ...], ...]
    """Each HF tensor's shape in symbols: ``V`` vocabulary, ``H`` hidden, ``F`` FFN,
    ``Q`` heads x head dim, ``K`` KV heads x head dim, ``D`` head dim, ``1``; in
    mixture-of-experts layers ``E`` experts, ``M`` one expert's FFN, ``S`` the
    shared expert's FFN."""
    local: str
    """megatron-core name template with megarm's local layer spec."""
    kind: Kind
    """How the HF tensor(s) become the megatron-core tensor: ``copy``; ``vocab-pad``
    (rows zero-padded to the padded vocabulary); ``qkv-group`` (q/k/v grouped per KV
    head, so a TP shard of whole groups is a contiguous slice); ``fc1-cat``
    (``[gate; up]``)."""
    part: Part
    """Which pipeline stage holds it: the first (embedding), a layer's, or the last."""
    tp: Split
    """How tensor parallelism splits the megatron-core tensor: along dim 0 or 1,
    ``fc1`` (the gate and up halves each along dim 0), ``None`` (replicated)."""
    te: str | None = None
    """The name with transformer-engine's layer spec, where it differs (TE fuses the
    layer norms into the following linear layer)."""
    head: str | None = None
    """The output head the tensor belongs to (``value`` for the value head);
    ``None``: the trunk."""

    @property
    def te_name(self) -> str:
        """The megatron-core name template with the transformer-engine spec."""
        return self.te or self.local

    def megatron(self, spec: Spec) -> str:
        """The megatron-core name template for ``spec``."""
        return self.te_name if spec == "te" else self.local


# --------------------------------------------------------------------------- shape


def padded_vocab_size(model: Any) -> int:
    """A ModelConfig's vocabulary rounded up to ``make_vocab_size_divisible_by``
    (independent of TP, so checkpoints reshard freely)."""
    div = model.make_vocab_size_divisible_by
    return int(math.ceil(model.vocab_size / div) * div)


def head_dim(model: Any) -> int:
    """A ModelConfig's per-head channel count (``kv_channels``, else hidden / heads)."""
    return model.kv_channels or model.hidden_size // model.num_attention_heads


@dataclass(frozen=True)
class Shape:
    """The sizes the weight table needs."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    padded_vocab_size: int
    routed_experts: int = 0
    """Routed experts per layer (0: a dense trunk)."""
    moe_ffn_hidden_size: int = 0
    """One routed expert's FFN size."""
    shared_ffn_hidden_size: int = 0
    """The shared expert's FFN size (0: none)."""
    num_labels: int = 1
    """Outputs of the value head (``score.weight`` rows; regression heads: > 1)."""

    @property
    def heads_per_group(self) -> int:
        """Query heads per KV head."""
        return self.num_attention_heads // self.num_query_groups

    @classmethod
    def of(cls, model: Any) -> Shape:
        """From a :class:`megarm.config.ModelConfig`."""
        return cls(
            num_layers=model.num_layers,
            hidden_size=model.hidden_size,
            ffn_hidden_size=model.ffn_hidden_size,
            num_attention_heads=model.num_attention_heads,
            num_query_groups=model.num_query_groups,
            head_dim=head_dim(model),
            vocab_size=model.vocab_size,
            padded_vocab_size=padded_vocab_size(model),
            routed_experts=model.num_moe_experts or 0,
            moe_ffn_hidden_size=model.moe_ffn_hidden_size or 0,
            shared_ffn_hidden_size=model.moe_shared_expert_intermediate_size or 0,
            num_labels=getattr(model, "num_labels", 1),
        )

    def size(self, symbol: str) -> int:
        """The size a shape symbol of :attr:`WeightRule.shapes` stands for."""
        return {
            "V": self.vocab_size,
            "H": self.hidden_size,
            "F": self.ffn_hidden_size,
            "Q": self.num_attention_heads * self.head_dim,
            "K": self.num_query_groups * self.head_dim,
            "D": self.head_dim,
            "E": self.routed_experts,
            "M": self.moe_ffn_hidden_size,
            "S": self.shared_ffn_hidden_size,
            "1": 1,
            "N": self.num_labels,
        }[symbol]


@dataclass(frozen=True)
class Entry:
    """A weight rule expanded for one layer: concrete names."""

    hf: tuple[str, ...]
    mcore: str
    rule: WeightRule
    layer: int | None

    @property
    def kind(self) -> Kind:
        """The rule's transform."""
        return self.rule.kind

    @property
    def part(self) -> Part:
        """The rule's pipeline stage."""
        return self.rule.part


# --------------------------------------------------------------------------- family

# Top-level keys transformers 4.x reads that transformers 5's save_pretrained no longer
# writes (5 keeps RoPE under rope_parameters, calls the dtype ``dtype``, Qwen3-MoE's
# expert count num_local_experts): what :meth:`Family.legacy` adds back.
LEGACY_KEYS = ("rope_theta", "rope_scaling", "torch_dtype", "num_experts")

# Source config.json keys an export does not copy: they describe the source's files
# (its class, remote code, quantised weights, label names) rather than the model.
NOT_EXPORTED = frozenset({
    "architectures", "auto_map", "quantization_config", "_name_or_path", "id2label",
    "label2id", "num_labels", "transformers_version",
})


class Read(NamedTuple):
    """One ModelConfig value read from an HF config."""

    key: str
    """The HF key it came from (the spelling found)."""
    hf_value: Any
    """The value in the HF config (or HF's default)."""
    value: Any
    """The megarm value."""
    defaulted: bool = False
    """The HF config lacks the key: ``hf_value`` is what transformers assumes."""

    def describe(self) -> str:
        """``key=value`` for messages, saying when the value is HF's default."""
        text = f"{self.key}={self.hf_value!r}"
        return text + " (transformers' default: the key is absent)" if self.defaulted else text


@dataclass(frozen=True)
class Family:
    """One HF model family, as data (see the module docstring)."""

    name: str
    """megarm's name for it (``model.family``)."""
    model_type: str
    """HF ``model_type``."""
    causal_lm: str
    """HF class of the trunk with its LM head (an accepted input)."""
    sequence_classification: str
    """HF class of the trunk with a ``score`` head: a reward model (num_labels=1),
    accepted as input and written by the export."""
    config: tuple[ConfigKey, ...]
    """HF config keys <-> ModelConfig fields (both directions)."""
    weights: tuple[WeightRule, ...]
    """The weight table, in model order."""
    fixed: Mapping[str, Any] = field(default_factory=dict)
    """ModelConfig fields this family always has (e.g. ``add_qkv_bias``)."""
    hf_fixed: Mapping[str, Any] = field(default_factory=dict)
    """HF keys with the only value megarm can represent: read, a present other value
    is refused; written into the export."""
    refusals: tuple[Refusal, ...] = ()
    """HF config values megarm refuses, with the reason."""
    dropped: tuple[str, ...] = ()
    """HF tensors a reward model leaves out (the LM head)."""
    dropped_suffixes: tuple[str, ...] = ()
    """Suffixes of HF tensors left out (RoPE buffers some old checkpoints saved)."""
    carried: tuple[str, ...] = ()
    """HF keys that describe more than the shape (token ids, initialiser); the export
    copies them from the source config.json when there is one."""
    about: str = ""
    """One line for the documentation: which published models this covers."""
    windowed: bool = False
    """Its transformers 4.x config has sliding-window keys (Qwen2, Qwen3 and their
    mixture-of-experts siblings): the export writes the window off (megarm attends
    over the whole sequence), as the published configs do."""

    @property
    def token_classification(self) -> str:
        """HF class of the trunk with a per-token ``score`` head: what a process
        reward model (``training.objective: prm``) is exported as."""
        return self.sequence_classification.replace("ForSequenceClassification",
                                                    "ForTokenClassification")

    @property
    def architectures(self) -> tuple[str, str]:
        """The HF architecture names accepted as input."""
        return (self.causal_lm, self.sequence_classification)

    # ----------------------------------------------------------------- HF -> megarm

    def refuse(self, hf: Mapping[str, Any], source: str = "config.json") -> list[str]:
        """Why megarm cannot represent the model ``hf`` describes (empty when it can)."""
        problems = []
        for key, wanted in self.hf_fixed.items():
            value = _get(hf, key)
            if value is not None and value != wanted:
                problems.append(
                    f"{source}: {key}={value!r}; megarm's {self.name} has {key}={wanted!r} "
                    "(it cannot represent another value)"
                )
        for refusal in self.refusals:
            value = _get(hf, refusal.key)
            if value is not None and refusal.applies(value):
                problems.append(f"{source}: {refusal.reason.format(value=value)}")
        return problems

    def read(self, hf: Mapping[str, Any], source: str = "config.json") -> dict[str, Read]:
        """ModelConfig field -> :class:`Read` for the model ``hf`` describes, with the
        family itself and its fixed fields. Raises :class:`FamilyError` naming every
        refused or missing key."""
        problems = self.refuse(hf, source)
        by_type = Read("model_type", self.model_type, self.name)
        out: dict[str, Read] = {"family": by_type}
        out.update({name: by_type._replace(value=value) for name, value in self.fixed.items()})
        missing = []
        for key in self.config:
            if key.when is not None and not (key.when in out and out[key.when].value):
                continue
            name, value = key.lookup(hf)
            if value is _MISSING and key.same_as is not None:
                name, value = key.same_as, _get(hf, key.same_as)
                value = _MISSING if value is None else value
            defaulted = value is _MISSING
            if defaulted:
                if key.default is _MISSING or key.when is not None:
                    missing.append(key.hf)
                    continue
                if key.default is None:
                    continue
                value = key.default
            ours = value
            if key.values is not None:
                if value not in key.values:
                    known = ", ".join(repr(v) for v in key.values)
                    problems.append(
                        f"{source}: {key.what or key.hf} {value!r} is not supported by megarm's "
                        f"{self.name} (it implements {known}); {name} names it"
                    )
                    continue
                ours = key.values[value]
            out[key.field] = Read(name, value, ours, defaulted)
        if missing:
            problems.append(
                f"{source} lacks {', '.join(missing)}; is it a {self.model_type} config.json?"
            )
        if problems:
            raise FamilyError("; ".join(problems))
        return out

    # ----------------------------------------------------------------- megarm -> HF

    def write(self, model: Any) -> dict[str, Any]:
        """The HF config keys (and ``model_type``) describing ``model`` (a ModelConfig),
        through the same table :meth:`read` uses."""
        out: dict[str, Any] = {"model_type": self.model_type}
        out.update(self.hf_fixed)
        for key in self.config:
            if key.when is not None and not getattr(model, key.when):
                continue
            value = getattr(model, key.field)
            if key.field == "kv_channels" and value is None:
                value = model.hidden_size // model.num_attention_heads
            if key.values is not None:
                value = next(hf for hf, ours in key.values.items() if ours == value)
                if value == key.default:
                    continue  # e.g. no rope_scaling for plain RoPE, as HF writes it
            _put(out, key.hf, value)
        return out

    def legacy(self, model: Any, source: Mapping[str, Any], dtype: str) -> dict[str, Any]:
        """The keys transformers 4.x reads, in its spelling, with the values megarm
        trained ``model`` (a ModelConfig) with: the table's keys as :meth:`write` gives
        them (top-level ``rope_theta``, ``rope_scaling``, ``num_experts``), the
        weights' ``torch_dtype``, and a ``windowed`` family's window switched off.
        transformers 5 keeps RoPE under ``rope_parameters`` only; 4.x ignores that key
        and silently uses its default base 10000 (every reward wrong, no warning).
        ``source``: what is known of the config.json (the source's keys over what
        transformers 5 saved): its window keys are kept where they mean no window."""
        out = self.write(model)
        del out["model_type"]
        # 4.x: null means plain RoPE (the published configs write it so).
        out.setdefault("rope_scaling", None)
        out["torch_dtype"] = dtype
        if self.windowed:
            out["use_sliding_window"] = False
            # 4.51's Qwen2 and Qwen3 mask beyond ``sliding_window`` whenever it is set,
            # whatever use_sliding_window says (default 4096): null, or a published
            # value no sequence reaches (Qwen2.5's 32768/131072), is no window.
            window = source.get("sliding_window")
            reaches = isinstance(window, int) and window < model.max_position_embeddings
            out["sliding_window"] = None if window is None or reaches else window
            # Only read with a window on; layers from this index on would use it.
            out["max_window_layers"] = source.get("max_window_layers", model.num_layers)
        return out

    def export_config(
        self, saved: Mapping[str, Any], model: Any, source: Mapping[str, Any], dtype: str
    ) -> dict[str, Any]:
        """The export's config.json, read the same by transformers 4.x and 5: every key
        of the ``source`` config.json but those that describe another file
        (:data:`NOT_EXPORTED`), then what transformers 5 ``saved`` (``rope_parameters``,
        ``dtype``), then :meth:`legacy`'s keys in transformers 4.x's spelling."""
        out = {k: v for k, v in source.items() if k not in NOT_EXPORTED}
        out.update(saved)
        out.update(self.legacy(model, {**saved, **source}, dtype))
        out["dtype"] = dtype
        return dict(sorted(out.items()))

    def model_problems(self, model: Any) -> list[tuple[str, str]]:
        """(``model.<field>``, why) for fields this family cannot express."""
        problems = []
        for name, value in self.fixed.items():
            if getattr(model, name) != value:
                problems.append((
                    f"model.{name}",
                    f"model.family {self.name} has {name}={value!r} (its HF config cannot "
                    f"express {getattr(model, name)!r}); remove model.{name} or choose another "
                    "model.family",
                ))
        for key in self.config:
            if key.values is not None and getattr(model, key.field) not in key.values.values():
                problems.append((
                    f"model.{key.field}",
                    f"model.family {self.name} cannot express {key.field}="
                    f"{getattr(model, key.field)!r} (its {key.what or key.hf} is one of "
                    f"{', '.join(map(repr, key.values))})",
                ))
        return problems + self._moe_problems(model)

    def _moe_problems(self, model: Any) -> list[tuple[str, str]]:
        """Expert fields the family cannot express: experts on a dense family, none
        on a mixture-of-experts one, a shared expert the family has no place for."""
        fields = {key.field for key in self.config}
        experts = model.num_moe_experts
        if not self.moe:
            if experts:
                return [("model.num_moe_experts", (
                    f"model.family {self.name} is a dense trunk (got num_moe_experts={experts}); "
                    "remove it or choose a mixture-of-experts family (qwen3_moe, qwen2_moe)"
                ))]
            return []
        problems = []
        if not experts or experts < 1:
            return [("model.num_moe_experts", (
                f"model.family {self.name} has routed experts: set model.num_moe_experts "
                f"(>= 1, got {experts!r}) or model.hf_config"
            ))]
        if not 1 <= model.moe_router_topk <= experts:
            problems.append(("model.moe_router_topk", (
                f"must be within [1, num_moe_experts={experts}], got {model.moe_router_topk}"
            )))
        if not model.moe_ffn_hidden_size or model.moe_ffn_hidden_size < 1:
            problems.append(("model.moe_ffn_hidden_size", (
                f"model.family {self.name} needs each expert's FFN size (>= 1, got "
                f"{model.moe_ffn_hidden_size!r})"
            )))
        shared = model.moe_shared_expert_intermediate_size
        if "moe_shared_expert_intermediate_size" in fields:
            if not shared or shared < 1:
                problems.append(("model.moe_shared_expert_intermediate_size", (
                    f"model.family {self.name} has a shared expert: set its FFN size (>= 1, "
                    f"got {shared!r})"
                )))
        elif shared:
            problems.append(("model.moe_shared_expert_intermediate_size", (
                f"model.family {self.name} has no shared expert (got {shared}); remove it or "
                "choose qwen2_moe"
            )))
        if model.moe_aux_loss_coeff < 0:
            problems.append(("model.moe_aux_loss_coeff", f"must be >= 0, got {model.moe_aux_loss_coeff}"))
        if model.moe_z_loss_coeff is not None and not model.moe_z_loss_coeff >= 0:
            problems.append(("model.moe_z_loss_coeff",
                             f"must be >= 0 (or null: off), got {model.moe_z_loss_coeff}"))
        return problems

    # ----------------------------------------------------------------- weights

    @property
    def moe(self) -> bool:
        """Whether the family's trunk has mixture-of-experts layers (its table maps an
        expert count)."""
        return any(key.field == "num_moe_experts" for key in self.config)

    def entries(
        self, num_layers: int, heads: tuple[str, ...] = (), spec: Spec = "local", experts: int = 0
    ) -> list[Entry]:
        """Every tensor of a full model with the given output ``heads`` (``value``),
        in model order (embedding, layers, final); a rule with ``{e}`` once for each
        of the ``experts`` routed experts."""
        out: list[Entry] = []
        for part in ("embedding", "layer", "final"):
            for layer in range(num_layers) if part == "layer" else [None]:
                for rule in self.weights:
                    if rule.part != part or (rule.head is not None and rule.head not in heads):
                        continue
                    per_expert = "{e}" in rule.local
                    for expert in range(experts) if per_expert else [None]:
                        fmt: dict[str, int] = {"i": layer} if layer is not None else {}
                        if expert is not None:
                            fmt["e"] = expert
                        out.append(Entry(
                            hf=tuple(name.format(**fmt) for name in rule.hf),
                            mcore=rule.megatron(spec).format(**fmt),
                            rule=rule,
                            layer=layer,
                        ))
        return out

    def hf_shapes(self, shape: Shape, heads: tuple[str, ...] = ()) -> dict[str, tuple[int, ...]]:
        """The shape every HF tensor must have, by name."""
        out: dict[str, tuple[int, ...]] = {}
        for entry in self.entries(shape.num_layers, heads, experts=shape.routed_experts):
            for name, symbols in zip(entry.hf, entry.rule.shapes, strict=True):
                out[name] = tuple(shape.size(s) for s in symbols)
        return out

    def head_rule(self, head: str) -> WeightRule:
        """The weight rule of an output head (``value`` or ``lm``): the one lookup."""
        (rule,) = [rule for rule in self.weights if rule.head == head]
        return rule

    def is_dropped(self, hf_name: str) -> bool:
        """HF tensors a reward model leaves out on purpose."""
        return hf_name in self.dropped or hf_name.endswith(self.dropped_suffixes)

    @cached_property
    def _patterns(self) -> list[tuple[re.Pattern[str], WeightRule]]:
        found = []
        for rule in self.weights:
            for template in {rule.local, rule.te_name}:
                regex = re.escape(template)
                for slot in ("i", "e"):
                    regex = regex.replace(re.escape("{" + slot + "}"), rf"(?P<{slot}>\d+)")
                found.append((re.compile(regex + "$"), rule))
        return found

    def expert_of(self, megatron_name: str) -> tuple[int, int, int] | None:
        """``(expert, start, end)`` of a full-model megatron-core name of a routed
        expert's tensor (``name[start:end]`` spells the expert number); ``None`` for
        any other name."""
        for pattern, _ in self._patterns:
            found = pattern.match(megatron_name)
            if found and "e" in found.groupdict():
                return int(found["e"]), found.start("e"), found.end("e")
        return None

    def rule_of(self, megatron_name: str) -> WeightRule | None:
        """The rule of a full-model megatron-core name (either spec), or ``None``."""
        for pattern, rule in self._patterns:
            if pattern.match(megatron_name):
                return rule
        return None
