"""Handlers: one raw record -> (prompt messages, chosen response, rejected response, margin).

Every handler reads its fields through ``map_keys`` (canonical name -> column name
in the source; an empty string means "this dataset has no such column") and raises
:class:`RecordError` with a reject reason for records it cannot use. The shared
checks (empty response, identical responses) run once in :meth:`Handler.__call__`.

Two handlers feed critique models: ``critique_pairs`` (a pair plus a critique of
each side, :class:`Pair` ``chosen_critique`` / ``rejected_critique``) and ``sft``
(a prompt and the target to supervise, :class:`SFTRecord`; ``kind = "sft"``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

Messages = list[dict[str, str]]

# Reject reasons, in the order stats.json lists them.
REJECT_REASONS = (
    "malformed_json",
    "malformed_record",
    "missing_key",
    "empty_response",
    "identical",
    "tie",
    "too_long",
    "too_large",
    "too_few_responses",
    "score_count",
    "label_range",
    "no_steps",
    "step_label_count",
    "unknown_label",
    "marker_in_step",
)

_ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
}


class RecordError(Exception):
    """A record that cannot become a pair; ``reason`` is one of ``REJECT_REASONS``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Pair:
    """One preference pair before templating."""

    prompt: Messages
    chosen: str
    rejected: str
    margin: float | None = None
    chosen_critique: str | None = None
    """A critique of the chosen response (``critique_pairs``): each side becomes
    prompt + response + critique turn, the critique supervised."""
    rejected_critique: str | None = None
    """A critique of the rejected response."""


@dataclass
class SFTRecord:
    """One supervised fine-tuning record before templating: only ``target`` is
    supervised."""

    prompt: Messages
    target: str


def _maybe_json(value: Any) -> Any:
    """Lists stored as JSON text (CSV columns) become lists; anything else is unchanged."""
    if isinstance(value, str) and value[:1] == "[":
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _to_float(value: Any, field: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RecordError("malformed_record", f"{field}={value!r} is not a number") from None
    if math.isnan(number):
        raise RecordError("malformed_record", f"{field} is NaN")
    return number


def _message(item: Any, field: str) -> dict[str, str]:
    """A message dict; accepts OpenAI (role/content) and ShareGPT (from/value) keys."""
    if not isinstance(item, dict):
        raise RecordError("malformed_record", f"{field} has a message that is not an object")
    role = _ROLE_ALIASES.get(str(item.get("role", item.get("from", ""))).lower())
    content = item.get("content", item.get("value"))
    if role is None or not isinstance(content, str):
        raise RecordError(
            "malformed_record",
            f"{field} has a message without a system/user/assistant role and text content",
        )
    return {"role": role, "content": content}


def _messages(value: Any, field: str, default_role: str) -> Messages:
    """A string (one ``default_role`` message) or a list of messages."""
    value = _maybe_json(value)
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if not isinstance(value, list):
        raise RecordError("malformed_record", f"{field} must be a string or a list of messages")
    return [_message(item, field) for item in value]


def _with_system(messages: Messages, system: Any) -> Messages:
    if (
        isinstance(system, str)
        and system.strip()
        and (not messages or messages[0]["role"] != "system")
    ):
        return [{"role": "system", "content": system}, *messages]
    return messages


class Handler:
    """Base handler: key mapping, margin extraction and the shared checks.

    Args:
        map_keys: canonical key -> source column (``""``: absent); ``"margin"`` may map
            to one numeric column or to two ``[chosen_score, rejected_score]`` columns.
        margin: the same as ``map_keys["margin"]`` (the ``--margin`` flag).
    """

    name: ClassVar[str]
    keys: ClassVar[tuple[str, ...]]
    aliases: ClassVar[dict[str, str]] = {}
    kind: ClassVar[str] = "pairs"
    """``pairs`` (preference pairs, critique pairs included) or ``sft`` (records)."""

    def __init__(
        self, map_keys: dict[str, Any] | None = None, margin: str | list[str] | None = None
    ) -> None:
        mapping = {key: key for key in self.keys}
        margin_spec: Any = margin
        for key, column in (map_keys or {}).items():
            if key == "margin":
                if margin is not None and column != margin:
                    raise ValueError(
                        f"--margin {margin!r} and --map-keys margin {column!r} disagree; give one"
                    )
                margin_spec = column
                continue
            canonical = self.aliases.get(key, key)
            if canonical not in mapping:
                valid = ", ".join(sorted({*self.keys, *self.aliases, "margin"}))
                raise ValueError(
                    f"--map-keys names {key!r}, which handler {self.name} does not read; "
                    f"valid keys: {valid}"
                )
            mapping[canonical] = column
        self.mapping = mapping
        if isinstance(margin_spec, str):
            margin_spec = [margin_spec]
        if margin_spec is not None and (
            not isinstance(margin_spec, (list, tuple))
            or len(margin_spec) not in (1, 2)
            or not all(isinstance(c, str) and c for c in margin_spec)
        ):
            raise ValueError(
                f"margin must name one numeric column or two [chosen, rejected] score columns, "
                f"got {margin_spec!r}"
            )
        self.margin_columns: list[str] | None = list(margin_spec) if margin_spec else None

    @property
    def has_margin(self) -> bool:
        """Whether every pair carries a margin (a ``_packed_margin_document`` file)."""
        return self.margin_columns is not None

    def get(self, record: dict[str, Any], key: str, required: bool = True) -> Any:
        """The value of canonical ``key`` (through ``map_keys``); None if optional and absent."""
        column = self.mapping[key]
        value = record.get(column) if column else None
        if value is None and required:
            where = f"column {column!r}" if column else "no column (mapped to '')"
            raise RecordError("missing_key", f"{key} ({where}) is missing")
        return value

    def margin(self, record: dict[str, Any]) -> float | None:
        """The margin from the margin column(s), or None when no margin is configured."""
        if self.margin_columns is None:
            return None
        values = []
        for column in self.margin_columns:
            if record.get(column) is None:
                raise RecordError("missing_key", f"margin column {column!r} is missing")
            values.append(_to_float(record[column], column))
        return values[0] if len(values) == 1 else values[0] - values[1]

    def extract(self, record: dict[str, Any]) -> Pair:
        """Handler-specific part: build the pair (margin may be left None)."""
        raise NotImplementedError

    def __call__(self, record: dict[str, Any]) -> Pair:
        """The pair for ``record``; raises ``RecordError`` with the reject reason."""
        pair = self.extract(record)
        for side in ("chosen", "rejected"):
            text = getattr(pair, side)
            if not isinstance(text, str):
                raise RecordError("malformed_record", f"{side} response is not text")
            if not text.strip():
                raise RecordError("empty_response", f"{side} response is empty")
        if pair.chosen.strip() == pair.rejected.strip():
            raise RecordError("identical", "chosen and rejected responses are identical")
        if not pair.prompt:
            raise RecordError("malformed_record", "the prompt has no messages")
        if pair.margin is None:
            pair.margin = self.margin(record)
        return pair


def _split_last_assistant(conversation: Messages, side: str) -> tuple[Messages, str]:
    if not conversation or conversation[-1]["role"] != "assistant":
        raise RecordError("malformed_record", f"{side} does not end with an assistant turn")
    return conversation[:-1], conversation[-1]["content"]


class PairwiseMessagesHandler(Handler):
    """TRL / OpenRLHF preference rows: ``chosen``/``rejected`` as strings or message
    lists, optional ``prompt`` (string or messages) and ``system``.

    With message lists the shared prefix is the prompt and the last assistant turn is
    the response; lists holding only the assistant turn get ``prompt`` prepended.
    """

    name = "pairwise_messages"
    keys = ("prompt", "chosen", "rejected", "system")

    def extract(self, record: dict[str, Any]) -> Pair:
        chosen_raw = self.get(record, "chosen")
        rejected_raw = self.get(record, "rejected")
        prompt_raw = self.get(record, "prompt", required=False)
        conversations = []
        for side, raw in (("chosen", chosen_raw), ("rejected", rejected_raw)):
            conversation = _messages(raw, side, default_role="assistant")
            if all(m["role"] == "assistant" for m in conversation):
                if prompt_raw is None:
                    self.get(record, "prompt")  # raises missing_key naming the column
                conversation = _messages(prompt_raw, "prompt", default_role="user") + conversation
            conversations.append(conversation)
        prompt, chosen = _split_last_assistant(conversations[0], "chosen")
        prompt_r, rejected = _split_last_assistant(conversations[1], "rejected")
        if prompt != prompt_r:
            raise RecordError(
                "malformed_record", "chosen and rejected differ before their last assistant turn"
            )
        return Pair(
            _with_system(prompt, self.get(record, "system", required=False)), chosen, rejected
        )


class AlpacaPairwiseHandler(Handler):
    """MindSpeed-RL / LLaMA-Factory Alpaca ranking rows: ``instruction``, ``input``,
    ``output`` = [chosen, rejected] (or ``chosen``/``rejected`` columns), optional
    ``system`` and ``history`` = [[user, assistant], ...].

    The user turn is ``instruction + "\\n" + input`` (just ``instruction`` when input
    is empty). MindSpeed-RL's key names ``prompt``/``query``/``response`` are accepted
    in ``map_keys`` as aliases of ``instruction``/``input``/``output``.
    """

    name = "alpaca_pairwise"
    keys = ("instruction", "input", "output", "chosen", "rejected", "system", "history")
    aliases = {"prompt": "instruction", "query": "input", "response": "output"}

    def extract(self, record: dict[str, Any]) -> Pair:
        instruction = self.get(record, "instruction")
        extra = self.get(record, "input", required=False) or ""
        if not isinstance(instruction, str) or not isinstance(extra, str):
            raise RecordError("malformed_record", "instruction and input must be text")
        output = _maybe_json(self.get(record, "output", required=False))
        if output is None:
            responses = [self.get(record, "chosen"), self.get(record, "rejected")]
        elif isinstance(output, (list, tuple)) and len(output) == 2:
            responses = list(output)
        else:
            raise RecordError("malformed_record", "output must be a list [chosen, rejected]")
        messages: Messages = []
        for turn in _maybe_json(self.get(record, "history", required=False)) or []:
            if not (
                isinstance(turn, (list, tuple))
                and len(turn) == 2
                and all(isinstance(t, str) for t in turn)
            ):
                raise RecordError("malformed_record", "history must be a list of [user, assistant]")
            messages += [
                {"role": "user", "content": turn[0]},
                {"role": "assistant", "content": turn[1]},
            ]
        query = f"{instruction}\n{extra}" if extra else instruction
        messages.append({"role": "user", "content": query})
        system = self.get(record, "system", required=False)
        return Pair(_with_system(messages, system), responses[0], responses[1])


_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def _parse_hh(text: Any, side: str) -> Messages:
    if not isinstance(text, str):
        raise RecordError("malformed_record", f"{side} must be a transcript string")
    pieces = _HH_TURN.split(text)
    if pieces[0].strip() or len(pieces) < 3:
        raise RecordError(
            "malformed_record", f"{side} is not a '\\n\\nHuman: ...\\n\\nAssistant: ...' transcript"
        )
    return [
        {"role": "user" if role == "Human" else "assistant", "content": content.strip()}
        for role, content in zip(pieces[1::2], pieces[2::2], strict=True)
    ]


class HHRLHFHandler(Handler):
    """Anthropic HH-RLHF: ``chosen``/``rejected`` are whole ``\\n\\nHuman:``/``\\n\\nAssistant:``
    transcripts that share the conversation and differ in the last assistant turn."""

    name = "hh_rlhf"
    keys = ("chosen", "rejected")

    def extract(self, record: dict[str, Any]) -> Pair:
        chosen = _parse_hh(self.get(record, "chosen"), "chosen")
        rejected = _parse_hh(self.get(record, "rejected"), "rejected")
        prompt, chosen_text = _split_last_assistant(chosen, "chosen")
        prompt_r, rejected_text = _split_last_assistant(rejected, "rejected")
        if prompt != prompt_r:
            raise RecordError(
                "malformed_record", "chosen and rejected transcripts differ before the last turn"
            )
        return Pair(prompt, chosen_text, rejected_text)


class StackExchangePairedHandler(Handler):
    """lvwerra/stack-exchange-paired: ``question``, ``response_j`` (preferred), ``response_k``."""

    name = "stack_exchange_paired"
    keys = ("question", "response_j", "response_k")

    def extract(self, record: dict[str, Any]) -> Pair:
        question = self.get(record, "question")
        if not isinstance(question, str):
            raise RecordError("malformed_record", "question must be text")
        prompt = [{"role": "user", "content": question}]
        return Pair(prompt, self.get(record, "response_j"), self.get(record, "response_k"))


def _helpsteer_prompt(prompt: str) -> Messages:
    """HelpSteer2 multi-turn prompts: ``u1\\n<extra_id_1>Assistant\\na1\\n<extra_id_1>User\\nu2``."""
    segments = prompt.split("\n<extra_id_1>")
    messages = [{"role": "user", "content": segments[0]}]
    for segment in segments[1:]:
        role, _, content = segment.partition("\n")
        if role not in ("User", "Assistant"):
            return [{"role": "user", "content": prompt}]  # not the turn format: keep verbatim
        messages.append({"role": role.lower(), "content": content})
    return messages


class HelpSteer2PreferenceHandler(Handler):
    """nvidia/HelpSteer2 preference rows: ``prompt``, ``response_1``, ``response_2``,
    ``preference_strength`` (> 0: response_2 preferred, < 0: response_1, 0: tie, dropped).

    With a margin column (``--margin preference_strength``) the margin is its absolute
    value: the sign only says which response is chosen.
    """

    name = "helpsteer2_preference"
    keys = ("prompt", "response_1", "response_2", "preference_strength")

    def extract(self, record: dict[str, Any]) -> Pair:
        prompt = self.get(record, "prompt")
        if not isinstance(prompt, str):
            raise RecordError("malformed_record", "prompt must be text")
        strength = _to_float(self.get(record, "preference_strength"), "preference_strength")
        if strength == 0:
            raise RecordError("tie", "preference_strength is 0")
        first, second = self.get(record, "response_1"), self.get(record, "response_2")
        chosen, rejected = (second, first) if strength > 0 else (first, second)
        margin = self.margin(record)
        return Pair(
            _helpsteer_prompt(prompt), chosen, rejected, None if margin is None else abs(margin)
        )


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise RecordError("malformed_record", f"{field} is not text")
    if not value.strip():
        raise RecordError("empty_response", f"{field} is empty")
    return value


class CritiquePairsHandler(PairwiseMessagesHandler):
    """Critique pairs (CLoud's stage 3 data, or WorldPM-style pairs with a reason):
    a ``pairwise_messages`` record plus ``chosen_critique`` and ``rejected_critique``,
    one critique of each response (what ``python -m megarm.generate`` writes).

    Each side becomes prompt + response + a user turn asking for a critique (the
    ``--critique-prompt`` text) + the critique as the assistant's answer; only the
    critique is supervised and the reward is read at its end."""

    name = "critique_pairs"
    keys = ("prompt", "chosen", "rejected", "system", "chosen_critique", "rejected_critique")

    def extract(self, record: dict[str, Any]) -> Pair:
        pair = super().extract(record)
        pair.chosen_critique = _text(self.get(record, "chosen_critique"), "chosen_critique")
        pair.rejected_critique = _text(self.get(record, "rejected_critique"), "rejected_critique")
        return pair


class SFTHandler(Handler):
    """Supervised fine-tuning records (CLoud's stage 1 on critiques, or a plain SFT
    stage): ``prompt`` (text or messages) and ``target`` (the text to supervise), or
    ``messages`` ending with the assistant turn to supervise; optional ``system``.
    ``response``, ``completion`` and ``output`` are accepted as names of ``target``.
    Only the target's tokens (and the end of its turn) are supervised."""

    name = "sft"
    kind = "sft"
    keys = ("prompt", "target", "messages", "system")
    aliases = {"response": "target", "completion": "target", "output": "target"}

    def __init__(
        self, map_keys: dict[str, Any] | None = None, margin: str | list[str] | None = None
    ) -> None:
        if margin is not None or (map_keys and "margin" in map_keys):
            raise ValueError("handler sft reads no margin; drop --margin")
        super().__init__(map_keys)

    def extract(self, record: dict[str, Any]) -> SFTRecord:  # type: ignore[override]
        target = self.get(record, "target", required=False)
        if target is None:
            for column in ("response", "completion", "output"):
                if self.mapping["target"] == "target" and record.get(column) is not None:
                    target = record[column]
                    break
        if target is None and self.get(record, "messages", required=False) is not None:
            conversation = _messages(self.get(record, "messages"), "messages", "user")
            prompt, target = _split_last_assistant(conversation, "messages")
        else:
            if target is None:
                self.get(record, "target")  # raises missing_key naming the column
            prompt = _messages(self.get(record, "prompt"), "prompt", default_role="user")
        return SFTRecord(_with_system(prompt, self.get(record, "system", required=False)), target)

    def __call__(self, record: dict[str, Any]) -> SFTRecord:  # type: ignore[override]
        sample = self.extract(record)
        _text(sample.target, "target")
        if not sample.prompt:
            raise RecordError("malformed_record", "the prompt has no messages")
        return sample


HANDLERS: dict[str, type[Handler]] = {
    cls.name: cls
    for cls in (
        PairwiseMessagesHandler,
        AlpacaPairwiseHandler,
        HHRLHFHandler,
        StackExchangePairedHandler,
        HelpSteer2PreferenceHandler,
        CritiquePairsHandler,
        SFTHandler,
    )
}
# Ranked records (K responses per prompt, objective listwise) and regression records
# (per-attribute labels, objective regression) live in their own modules,
# which builds on this one: registered here, after every name it imports exists.
from megarm.data.ranked import RANKED_HANDLERS  # noqa: E402
from megarm.data.regression import REGRESSION_HANDLERS  # noqa: E402
from megarm.data.steps import STEP_HANDLERS  # noqa: E402

HANDLERS.update(RANKED_HANDLERS)
HANDLERS.update(REGRESSION_HANDLERS)
HANDLERS.update(STEP_HANDLERS)
# MindSpeed-RL's class names, so its dataset YAMLs work unchanged.
HANDLER_ALIASES = {"AlpacaStylePairwiseHandler": "alpaca_pairwise"}


def get_handler(
    name: str, map_keys: dict[str, Any] | None = None, margin: str | list[str] | None = None
) -> Handler:
    """Instantiate the handler registered as ``name`` (or a MindSpeed-RL alias)."""
    cls = HANDLERS.get(HANDLER_ALIASES.get(name, name))
    if cls is None:
        raise ValueError(f"unknown --handler-name {name!r}; choose from {', '.join(HANDLERS)}")
    return cls(map_keys=map_keys, margin=margin)
