"""Text -> token rows in the form the model was trained on.

Preference records go through preprocessing's own record encoder
(:func:`megarm.data.encoding.encode_records`); everything else through the same
template, tokenizer calls and truncation rule (``fit_prompt``). Critique models'
rows are prompt + response + critique turn + critique, as preprocessing's
``critique_pairs`` writes them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from megarm.data.encoding import TRUNCATION_POLICIES, encode_records, fit_prompt
from megarm.data.handlers import Handler, RecordError
from megarm.data.readers import RawRecord
from megarm.data.templates import (
    DEFAULT_CRITIQUE_PROMPT,
    Template,
    TemplateError,
    critique_turn,
    get_template,
    reward_convention,
)
from megarm.data.tokenizer import TokenizerError, load_tokenizer
from megarm.errors import ScoringError


def chat_messages(value: Any, what: str = "messages") -> list[dict[str, str]]:
    """A list of ``{"role", "content"}`` messages (text content), or ``RecordError``."""
    if not isinstance(value, list) or not value:
        raise RecordError("malformed_record", f"{what} must be a non-empty list of messages")
    out = []
    for message in value:
        if not (
            isinstance(message, dict)
            and message.get("role") in ("system", "user", "assistant")
            and isinstance(message.get("content"), str)
        ):
            raise RecordError(
                "malformed_record",
                f"{what} holds a message without a system/user/assistant role and text content",
            )
        out.append({"role": message["role"], "content": message["content"]})
    return out


def prompt_messages(value: Any, what: str = "prompt") -> list[dict[str, str]]:
    """A prompt given as text (one user turn) or as messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return chat_messages(value, what)


class Encoder:
    """Text -> token rows in the form the model was trained on.

    ``seq_length`` caps a row (``None``: no cap); a longer prompt is cut by
    ``truncation`` (preprocessing's policies: ``left``, ``right``, ``drop``), the
    responses never are. Methods raise :class:`RecordError` for input they cannot use.
    """

    def __init__(
        self,
        tokenizer: Any,
        template: Template,
        seq_length: int | None = None,
        truncation: str = "left",
    ) -> None:
        if truncation not in TRUNCATION_POLICIES:
            raise ScoringError(f"--truncation {truncation!r}: choose from {TRUNCATION_POLICIES}")
        self.tokenizer = tokenizer
        self.template = template
        self.seq_length = seq_length
        self.truncation = truncation
        self.header_len = len(self._encode([template.header])[0])
        # Padding a client may leave after the response (never the end-of-turn marker).
        self.trailing = tuple(
            t for t in {tokenizer.pad_token, tokenizer.eos_token} if t and t != template.end_of_turn
        )
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.pad_id = int(pad)

    @property
    def convention(self) -> dict[str, Any]:
        """Where the reward is read (:func:`megarm.data.templates.reward_convention`)."""
        return reward_convention(self.template, self.tokenizer)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        # As preprocessing: no BOS/EOS added, the template carries the specials.
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def _join(self, prompt: str, responses: list[str]) -> tuple[list[list[int]], bool]:
        ids = self._encode([prompt, *responses])
        cut, truncated = fit_prompt(
            ids[0], max(len(r) for r in ids[1:]), self.seq_length, self.header_len, self.truncation
        )
        return [cut + response for response in ids[1:]], truncated

    def pairs(
        self, records: Iterable[RawRecord], handler: Handler
    ) -> Iterator[tuple[RawRecord, tuple]]:
        """Preference records through preprocessing's record encoder: ``(raw, result)``
        with result ``("ok", prompt, chosen, rejected, margin, truncated)`` or
        ``("reject", reason, detail)``."""
        return encode_records(
            records, handler, self.template, self.tokenizer, self.seq_length, self.truncation
        )

    def group(
        self, prompt: Any, responses: Sequence[Any], allow_empty: bool = False
    ) -> tuple[list[list[int]], bool]:
        """Rows for several responses to one prompt (text or messages), sharing one
        cut prompt as preprocessing's chosen and rejected do; and whether it was cut.
        An empty response is refused unless ``allow_empty`` (benchmarks score them)."""
        messages = prompt_messages(prompt)
        for response in responses:
            if not isinstance(response, str):
                raise RecordError("malformed_record", "a response is not text")
            if not response.strip() and not allow_empty:
                raise RecordError("empty_response", "a response is empty")
        if not responses:
            raise RecordError("missing_key", "no responses to score")
        prompt_text = self.template.prompt(messages)
        return self._join(prompt_text, [self.template.response(r) for r in responses])

    def critique_rows(
        self,
        prompt: Any,
        responses: Sequence[str],
        critiques: Sequence[str],
        critique_prompt: str = DEFAULT_CRITIQUE_PROMPT,
    ) -> tuple[list[list[int]], bool]:
        """Rows of a critique model: prompt + response + critique turn + critique per
        response, tokenized in the same parts as preprocessing's ``critique_pairs``
        (one shared prompt, cut as there); and whether the prompt was cut."""
        messages = prompt_messages(prompt)
        head: list[int] = []
        tails = []
        for response, critique in zip(responses, critiques, strict=True):
            text, rest = critique_turn(self.template, messages, response, critique_prompt)
            head, rest_ids, critique_ids = self._encode(
                [text, rest, self.template.response(critique)]
            )
            tails.append(rest_ids + critique_ids)
        cut, truncated = fit_prompt(
            head, max(map(len, tails)), self.seq_length, self.header_len, self.truncation
        )
        return [cut + tail for tail in tails], truncated

    def conversation(self, messages: Any) -> list[int]:
        """The row for a conversation whose last message is the scored assistant turn."""
        checked = chat_messages(messages)
        if checked[-1]["role"] != "assistant":
            raise RecordError(
                "malformed_record", "the last message must be the assistant response to score"
            )
        return self.group(checked[:-1], [checked[-1]["content"]])[0][0]

    def text(self, text: Any, prompt: Any = None) -> list[int]:
        """The row for a chat-formatted conversation as text (OpenRLHF's ``query``):
        padding dropped, the response end put into the model's form, the prompt split
        off at ``prompt`` (when ``text`` starts with it) or at the last assistant header."""
        if not isinstance(text, str):
            raise RecordError("malformed_record", "a query is not text")
        head, response = self.template.split_text(
            text, prompt if isinstance(prompt, str) else None, self.trailing
        )
        return self._join(head, [response])[0][0]


def build_encoder(
    tokenizer_dir: str,
    prompt_type: str = "auto",
    sequence_end: str | None = None,
    seq_length: int | None = None,
    truncation: str = "left",
) -> Encoder:
    """Load the tokenizer and template; ``ScoringError`` with the fix when unusable."""
    try:
        tokenizer = load_tokenizer(tokenizer_dir)
        template = get_template(prompt_type, tokenizer, sequence_end)
    except (TokenizerError, TemplateError) as exc:
        raise ScoringError(str(exc)) from exc
    return Encoder(tokenizer, template, seq_length, truncation)
