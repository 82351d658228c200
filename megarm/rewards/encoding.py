"""Text -> token rows in the form the model was trained on.

Preference records go through preprocessing's own record encoder
(:func:`megarm.data.encoding.encode_records`); everything else through the same
template, tokenizer calls and truncation rule (``fit_prompt``). Critique models'
rows are prompt + response + critique turn + critique, as preprocessing's
``critique_pairs`` writes them.
"""

from __future__ import annotations

import json
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


def token_text_bytes(tokenizer: Any) -> int | None:
    """The most UTF-8 bytes of normalised text one token can stand for, or ``None``
    where no such bound holds (a slow tokenizer, a model other than BPE, unknown
    pieces fused into one token, a pre-tokenizer that drops characters).

    For a byte-level BPE (Qwen, Llama 3) a vocabulary entry has one character per
    byte; elsewhere its UTF-8 length over-counts (``▁`` is 3 bytes for a space),
    which only makes the bound looser."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    pre = json.dumps(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or any(
        name in pre for name in ('"Whitespace"', '"WhitespaceSplit"', '"BertPreTokenizer"',
                                 '"Removed"')  # fmt: skip
    ):
        return None
    if model.get("fuse_unk") and not model.get("byte_fallback"):
        return None
    byte_level = '"ByteLevel"' in pre or '"ByteLevel"' in json.dumps(spec.get("decoder"))
    longest = max(len(t) if byte_level else len(t.encode()) for t in model.get("vocab", {}))
    normalize = backend.normalizer.normalize_str if backend.normalizer else (lambda t: t)
    for added in spec.get("added_tokens", []):
        longest = max(longest, len(normalize(added["content"]).encode()), len(added["content"].encode()))
    return longest


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
        # A text of more normalised bytes than this cannot fit seq_length (each token
        # stands for at most `per_token` bytes): it is cut, or refused, before the
        # tokenizer sees it. A text that fits is never cut, so its row is unchanged.
        per_token = token_text_bytes(tokenizer) if seq_length is not None else None
        self.text_bytes = None if per_token is None else seq_length * per_token + 16
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._normalize = (
            backend.normalizer.normalize_str if backend is not None and backend.normalizer
            else (lambda t: t)
        )

    @property
    def convention(self) -> dict[str, Any]:
        """Where the reward is read (:func:`megarm.data.templates.reward_convention`)."""
        return reward_convention(self.template, self.tokenizer)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        # As preprocessing: no BOS/EOS added, the template carries the specials.
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def _size(self, text: str) -> tuple[int, str]:
        """(normalised UTF-8 bytes, normalised text); short texts are not normalised."""
        assert self.text_bytes is not None
        if len(text) * 12 <= self.text_bytes:  # 4 bytes a character, NFC's 3x at most
            return 0, text
        normal = self._normalize(text)
        return len(normal.encode()), normal

    def _bound(self, prompt: str, responses: list[str]) -> str:
        """The prompt cut in bytes where it cannot fit (keeping twice the bound from
        each end the truncation keeps, so the kept tokens lie far from the cut); a
        response that cannot fit is refused without tokenizing it."""
        bound = self.text_bytes
        if bound is None:
            return prompt
        for response in responses:
            size, _ = self._size(response)
            if size > bound:
                raise RecordError(
                    "too_long", f"a response of {size} bytes cannot fit --seq-length "
                    f"{self.seq_length}",
                )  # fmt: skip
        size, normal = self._size(prompt)
        if size <= bound:
            return prompt
        if self.truncation == "drop":
            raise RecordError(
                "too_long", f"a prompt of {size} bytes cannot fit --seq-length {self.seq_length}"
            )
        data = normal.encode()

        def cut(keep: int) -> str:
            tail = data[-keep:].decode("utf-8", "ignore")
            if self.truncation == "left":
                return tail
            return data[:keep].decode("utf-8", "ignore") + tail

        # It cannot fit: keep at least twice seq_length tokens at each kept end, so
        # the tokens kept lie far from the cut. Most text has a few bytes a token: try
        # a short piece first, else the piece that holds them whatever the tokens.
        assert self.seq_length is not None
        want = 2 * self.seq_length * (1 if self.truncation == "left" else 2)
        short = cut(min(2 * bound, 32 * self.seq_length))
        if len(self._encode([short])[0]) >= want:
            return short
        return cut(2 * bound)

    def _join(self, prompt: str, responses: list[str]) -> tuple[list[list[int]], bool]:
        prompt = self._bound(prompt, responses)
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
