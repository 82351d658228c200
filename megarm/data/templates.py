"""Chat formatting: prompt messages -> prompt text, and how every response ends.

A reward model reads its score at one fixed token, so every template defines:

- ``prompt(messages)``: the templated conversation plus the assistant header (the
  generation prompt), e.g. ``...<|im_start|>assistant\\n``;
- ``end_of_turn``: the end-of-turn marker (``<|im_end|>`` for ChatML), which must be
  a single token of the tokenizer;
- ``response_end``: the text appended to every response: exactly what the chat
  template writes after an assistant message (``<|im_end|>\\n`` for ChatML). A
  sequence then ends where ``tokenizer.apply_chat_template(messages)`` ends, which is
  what RewardBench, TRL and vLLM's chat path feed a reward model; the reward is read
  at its last token (:func:`reward_convention` records which one);
- ``header``: the assistant header every prompt ends with; truncation never cuts it.

:meth:`Template.split_text` puts a chat-formatted text from a client (ending at
``<|im_end|>``, at ``<|im_end|>\\n``, with padding, or cut off) into that form.

Critique models read ``prompt + response + critique turn``: :func:`critique_turn`
renders the user turn asking for a critique (the ``critique_prompt`` text, which
users set) and the assistant header after the response; the critique is then a
response like any other (it ends with ``response_end`` and the reward is read at its
last token). Preprocessing, generation and scoring all build it here.
"""

from __future__ import annotations

from typing import Any

from megarm.data.handlers import RecordError
from megarm.data.tokenizer import QWEN_DEFAULT_SYSTEM

PROMPT_TYPES = ("auto", "chatml", "qwen", "llama3", "plain")

Messages = list[dict[str, str]]


class TemplateError(ValueError):
    """A template cannot be used with this tokenizer; the message names the fix."""


class Template:
    """Base class: subclasses set ``name``, ``header``, ``end_of_turn``,
    ``response_end`` and ``prompt``."""

    name: str
    header: str
    end_of_turn: str
    response_end: str

    def prompt(self, messages: Messages) -> str:
        """The templated ``messages`` followed by the assistant header."""
        raise NotImplementedError

    def response(self, text: str) -> str:
        """The response text as it is tokenized: ``text`` + :attr:`response_end`."""
        return text + self.response_end

    def split_text(
        self, text: str, prompt: str | None = None, trailing: tuple[str, ...] = ()
    ) -> tuple[str, str]:
        """A chat-formatted conversation as a client sends it -> ``(prompt text,
        response text)`` in this template's form (the response ending with
        :attr:`response_end`), as :meth:`prompt` and :meth:`response` would write them.

        Trailing ``trailing`` tokens (padding) and whatever follows the last
        end-of-turn marker are dropped; a response with no end-of-turn marker (cut
        off by a length limit) gets one. The prompt is ``prompt`` when ``text``
        starts with it, else everything up to the last assistant header.
        """
        # Padding, possibly several tokens, possibly after whitespace: walk an end
        # index (slicing each time made 2 MB of padding quadratic).
        end = len(text)
        while True:
            stripped = end
            while stripped and text[stripped - 1].isspace():
                stripped -= 1
            token = next((t for t in trailing if t and text.endswith(t, 0, stripped)), None)
            if token is None:
                break
            end = stripped - len(token)
        body = text if end == len(text) else text[:end]
        if body.rstrip().endswith(self.end_of_turn):
            body = body.rstrip()[: -len(self.end_of_turn)]
        if prompt and body.startswith(prompt):
            cut = len(prompt)
        else:
            at = body.rfind(self.header)
            if at < 0:
                raise RecordError(
                    "malformed_record",
                    f"the text has no assistant header {self.header!r}; send the conversation "
                    "as chat messages or as text formatted with the model's chat template",
                )
            cut = at + len(self.header)
        return body[:cut], self.response(body[cut:])

class ChatMLTemplate(Template):
    """``<|im_start|>role\\n...<|im_end|>\\n``; ``qwen`` adds Qwen's default system prompt."""

    header = "<|im_start|>assistant\n"
    end_of_turn = "<|im_end|>"
    response_end = "<|im_end|>\n"

    def __init__(self, name: str = "chatml", default_system: str | None = None) -> None:
        self.name = name
        self.default_system = default_system

    def prompt(self, messages: Messages) -> str:
        parts = []
        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            parts.append(f"<|im_start|>system\n{self.default_system}<|im_end|>\n")
        for message in messages:
            parts.append(f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>\n")
        parts.append(self.header)
        return "".join(parts)


class Llama3Template(Template):
    """Llama 3 Instruct: header ids around the role, ``<|eot_id|>`` after each turn."""

    name = "llama3"
    header = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    end_of_turn = "<|eot_id|>"
    response_end = "<|eot_id|>"

    def prompt(self, messages: Messages) -> str:
        # Llama 3's own template trims every message's content.
        parts = ["<|begin_of_text|>"]
        for message in messages:
            parts.append(
                f"<|start_header_id|>{message['role']}<|end_header_id|>\n\n"
                f"{message['content'].strip()}<|eot_id|>"
            )
        parts.append(self.header)
        return "".join(parts)


class PlainTemplate(Template):
    """No special tokens: ``System: ...`` / ``User: ...`` / ``Assistant: ...`` turns
    separated by blank lines; each response ends with the tokenizer's eos token."""

    name = "plain"
    header = "Assistant: "
    _labels = {"system": "System", "user": "User", "assistant": "Assistant"}

    def __init__(self, eos_token: str) -> None:
        self.end_of_turn = self.response_end = eos_token

    def prompt(self, messages: Messages) -> str:
        turns = [f"{self._labels[m['role']]}: {m['content']}\n\n" for m in messages]
        return "".join(turns) + self.header


class HFChatTemplate(Template):
    """The tokenizer's own Jinja chat template (``--prompt-type auto``).

    The assistant header and end-of-turn text are found by rendering probe
    conversations once: header = (with generation prompt) - (without), response end =
    what the template writes right after an assistant message (``<|im_end|>\\n`` for
    Qwen), end-of-turn = the response end minus trailing whitespace.
    """

    name = "auto"

    def __init__(self, tokenizer: Any) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError(
                f"tokenizer {tokenizer.name_or_path!r} has no chat template; pass "
                "--prompt-type chatml|qwen|llama3|plain"
            )
        self.tokenizer = tokenizer
        probe_user = [{"role": "user", "content": "megarm-probe-question"}]
        with_header = self._render(probe_user, generation_prompt=True)
        without = self._render(probe_user, generation_prompt=False)
        if not with_header.startswith(without) or with_header == without:
            raise TemplateError(
                f"the chat template of {tokenizer.name_or_path!r} has no separate assistant "
                "generation prompt; pass --prompt-type chatml|qwen|llama3|plain"
            )
        self.header = with_header[len(without) :]
        sentinel = "megarm-probe-answer"
        full = self._render(
            probe_user + [{"role": "assistant", "content": sentinel}], generation_prompt=False
        )
        tail = full.split(sentinel, 1)[1] if sentinel in full else ""
        self.end_of_turn = tail.rstrip() or (tokenizer.eos_token or "")
        self.response_end = tail if tail.rstrip() else self.end_of_turn
        if not self.end_of_turn:
            raise TemplateError(
                f"cannot tell the end-of-turn token of {tokenizer.name_or_path!r}: its chat "
                "template writes nothing after an assistant turn and it has no eos_token"
            )

    def _render(self, messages: Messages, generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )

    def prompt(self, messages: Messages) -> str:
        from jinja2 import TemplateError as JinjaError

        try:
            return self._render(messages, generation_prompt=True)
        except JinjaError as exc:  # e.g. "roles must alternate user/assistant"
            raise RecordError("malformed_record", f"the chat template refused it: {exc}") from exc


def get_template(prompt_type: str, tokenizer: Any, response_end: str | None = None) -> Template:
    """The template for ``--prompt-type``, checked against ``tokenizer``.

    ``response_end`` overrides what responses end with (a checkpoint's recorded
    :func:`reward_convention`, or ``--sequence-end``); it must start with the
    end-of-turn marker. Raises ``TemplateError`` when the end-of-turn marker is not a
    single token of the tokenizer (the reward would be read at an unstable position).
    """
    if prompt_type == "auto":
        template: Template = HFChatTemplate(tokenizer)
    elif prompt_type == "chatml":
        template = ChatMLTemplate("chatml")
    elif prompt_type == "qwen":
        template = ChatMLTemplate("qwen", default_system=QWEN_DEFAULT_SYSTEM)
    elif prompt_type == "llama3":
        template = Llama3Template()
    elif prompt_type == "plain":
        if not tokenizer.eos_token:
            raise TemplateError(
                f"--prompt-type plain ends responses with the eos token, but tokenizer "
                f"{tokenizer.name_or_path!r} has none"
            )
        template = PlainTemplate(tokenizer.eos_token)
    else:
        raise TemplateError(f"unknown --prompt-type {prompt_type!r}; choose from {PROMPT_TYPES}")
    ids = tokenizer.encode(template.end_of_turn, add_special_tokens=False)
    if len(ids) != 1:
        raise TemplateError(
            f"the {template.name} end-of-turn text {template.end_of_turn!r} is {len(ids)} tokens "
            f"for tokenizer {tokenizer.name_or_path!r}, not one; use --prompt-type auto or the "
            "template that matches this tokenizer"
        )
    if response_end is not None:
        if not response_end.startswith(template.end_of_turn):
            raise TemplateError(
                f"sequence end {response_end!r} does not start with the {template.name} "
                f"end-of-turn marker {template.end_of_turn!r}; pass one that does"
            )
        template.response_end = response_end
    return template


def reward_convention(
    template: Template, tokenizer: Any, critique_prompt: str | None = None,
    step_marker: str | None = None,
) -> dict[str, Any]:
    """Where the reward is read, as recorded in stats.json, checkpoints and exports:
    every sequence ends with ``sequence_end`` (the end of ``apply_chat_template``'s
    output for an assistant turn, unless overridden) and the reward is the value at
    its last token, ``reward_token_id``. A critique model also records the
    ``critique_prompt`` its critique turn asks with (scoring asks the same). A process
    reward model records its ``step_marker`` (text and token id): a reward is read at
    every step's marker token."""
    ids = tokenizer.encode(template.response_end, add_special_tokens=False)
    convention = {
        "sequence_end": template.response_end,
        "end_of_turn": template.end_of_turn,
        "reward_token_id": int(ids[-1]),
        "reward_position": "last token",
    }
    if critique_prompt is not None:
        convention["critique_prompt"] = critique_prompt
        convention["reward_position"] = "last token of the critique"
    if step_marker:
        ids = tokenizer.encode(step_marker, add_special_tokens=False)
        convention["step_marker"] = step_marker
        convention["step_marker_id"] = int(ids[-1])
        convention["reward_position"] = "every step_marker token"
    return convention


# Pads for tokenizers whose own pad ends a rewarded sequence (or that have none), in
# order of preference: Llama 3.1+'s <|finetune_right_pad_id|> (id 128004, Meta's pad
# for fine-tuning), then Llama 3's reserved special tokens (3.0 spells 128004
# <|reserved_special_token_2|>), which no text or generation produces.
RESERVED_PADS = ("<|finetune_right_pad_id|>",) + tuple(
    f"<|reserved_special_token_{n}|>" for n in range(256)
)


def ending_ids(tokenizer: Any, convention: dict[str, Any]) -> set[int]:
    """Token ids that can end a rewarded sequence: the convention's reward token, the
    end-of-turn token (where generation stops) and the tokenizer's eos."""
    ends = {int(convention["reward_token_id"])}
    ends.update(tokenizer.encode(convention["end_of_turn"], add_special_tokens=False)[-1:])
    if tokenizer.eos_token_id is not None:
        ends.add(int(tokenizer.eos_token_id))
    return ends


def reward_pad(
    tokenizer: Any, convention: dict[str, Any], requested: str | None = None
) -> tuple[int, str, str | None]:
    """``(id, text, why it changed or None)`` of the pad an export declares.

    transformers' ``*ForSequenceClassification`` reads the score at the last token
    that is not ``pad_token_id``: a pad equal to a token that ends rewarded sequences
    (Llama 3 tokenizers padded with ``<|eot_id|>`` or ``<|end_of_text|>``) makes it
    read the token before, a position never trained (transformers #35352). The
    tokenizer's own pad is kept when it ends nothing; else ``requested`` (a token
    text), else the first of :data:`RESERVED_PADS` the tokenizer has as one token.
    Raises :class:`TemplateError` when none is safe."""
    ends = ending_ids(tokenizer, convention)
    own = tokenizer.pad_token_id
    if requested is None and own is not None and int(own) not in ends:
        return int(own), str(tokenizer.pad_token), None
    why = ("the tokenizer has no pad token" if own is None else
           f"the tokenizer's pad {tokenizer.pad_token!r} (id {own}) ends rewarded sequences")
    for text in (requested,) if requested is not None else RESERVED_PADS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == 1 and ids[0] not in ends and tokenizer.convert_ids_to_tokens(ids[0]) == text:
            return int(ids[0]), text, why if requested is None else f"--pad-token {text!r} asked"
        if requested is not None:
            raise TemplateError(
                f"--pad-token {text!r} is not one token of the tokenizer other than those that "
                f"end rewarded sequences (ids {sorted(ends)})"
            )
    raise TemplateError(
        f"{why}, and the tokenizer has none of megarm's reserved pads; pass --pad-token with "
        "a token that never ends a rewarded sequence (not the end-of-turn or eos token)"
    )


DEFAULT_CRITIQUE_PROMPT = (
    "Critique the response above: say what is wrong with it, or that it is correct."
)


def critique_request(critique_prompt: str, prompt: Messages, response: str) -> str:
    """The user turn asking for a critique: ``critique_prompt`` with ``{prompt}`` (the
    last user message) and ``{response}`` filled in where it names them."""
    last_user = next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")
    return critique_prompt.replace("{prompt}", last_user).replace("{response}", response)


def critique_turn(
    template: Template, prompt: Messages, response: str, critique_prompt: str
) -> tuple[str, str]:
    """``(prompt text, rest)``: the templated prompt (ending with the assistant
    header), and what follows it before the critique: the response with its turn's
    end, the user turn asking for a critique, and the assistant header. The
    critique itself is ``template.response(critique)``.

    Both come from rendering the whole conversation once, so the text equals what
    the chat template writes for it; a template that rewrites earlier turns (so the
    prompt is not a prefix) is refused for the record."""
    head = template.prompt(prompt)
    conversation = [
        *prompt,
        {"role": "assistant", "content": response},
        {"role": "user", "content": critique_request(critique_prompt, prompt, response)},
    ]
    full = template.prompt(conversation)
    if not full.startswith(head):
        raise RecordError(
            "malformed_record",
            f"the {template.name} chat template renders the conversation with its critique "
            "turn differently from the prompt alone; use another --prompt-type",
        )
    return head, full[len(head) :]
