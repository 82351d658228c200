"""Ranked records (issue #28): K scored responses to one prompt, for the list-wise
objective (:mod:`megarm.training.objectives.listwise`).

Two handlers: ``ranked`` reads ``{prompt, responses: [...], scores: [...]}``
(prompt as text or messages, optional ``system``); ``ultrafeedback_ranked`` reads
UltraFeedback's raw rows, ``{instruction, completions: [{response, overall_score,
...}]}`` (``score_field`` picks another per-completion number, e.g.
``fine-grained_score``). Each returns a :class:`RankedRecord` or raises
:class:`~megarm.data.handlers.RecordError` with one of :data:`RANKED_REJECT_REASONS`:
fewer than two responses, a score count unlike the response count, a score that
is not a number or is NaN, an empty response, identical responses, or all scores
equal (nothing to rank).

Both are registered in ``megarm.data.handlers.HANDLERS``: preprocessing writes a
record as one document of K sequences in ``<prefix>_packed_ranked_{input_ids,labels}``
and its K scores as one document in ``<prefix>_packed_scores`` (stats.json ``kind:
ranked``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from megarm.data.handlers import (
    Handler,
    Messages,
    RecordError,
    _maybe_json,
    _messages,
    _to_float,
    _with_system,
)

RANKED_REJECT_REASONS = (
    "malformed_record",
    "missing_key",
    "too_few_responses",
    "score_count",
    "empty_response",
    "identical",
    "tie",
)


@dataclass
class RankedRecord:
    """One prompt with ``K >= 2`` responses and their scores (higher is better)."""

    prompt: Messages
    responses: list[str]
    scores: list[float]


class RankedHandler(Handler):
    """``{prompt, responses, scores}``; optional ``system``."""

    name = "ranked"
    kind = "ranked"
    keys = ("prompt", "responses", "scores", "system")

    def __init__(self, map_keys: dict[str, Any] | None = None, margin: str | list[str] | None = None) -> None:
        if margin is not None or (map_keys and "margin" in map_keys):
            raise ValueError(f"handler {self.name} reads no margin (the scores rank the responses); drop --margin")
        super().__init__(map_keys)

    def extract(self, record: dict[str, Any]) -> RankedRecord:  # type: ignore[override]
        prompt = _messages(self.get(record, "prompt"), "prompt", default_role="user")
        responses = _maybe_json(self.get(record, "responses"))
        scores = _maybe_json(self.get(record, "scores"))
        if not isinstance(responses, list) or not isinstance(scores, list):
            raise RecordError("malformed_record", "responses and scores must be lists")
        if len(scores) != len(responses):
            raise RecordError("score_count", f"{len(responses)} responses but {len(scores)} scores")
        return RankedRecord(
            _with_system(prompt, self.get(record, "system", required=False)),
            responses,
            [_to_float(s, f"scores[{i}]") for i, s in enumerate(scores)],
        )

    def __call__(self, record: dict[str, Any]) -> RankedRecord:  # type: ignore[override]
        sample = self.extract(record)
        if len(sample.responses) < 2:
            raise RecordError("too_few_responses", f"{len(sample.responses)} response(s); ranking needs 2 or more")
        for i, text in enumerate(sample.responses):
            if not isinstance(text, str):
                raise RecordError("malformed_record", f"responses[{i}] is not text")
            if not text.strip():
                raise RecordError("empty_response", f"responses[{i}] is empty")
        if len({text.strip() for text in sample.responses}) < len(sample.responses):
            raise RecordError("identical", "two responses are identical")
        if len(set(sample.scores)) == 1:
            raise RecordError("tie", "all scores are equal; nothing to rank")
        if not sample.prompt:
            raise RecordError("malformed_record", "the prompt has no messages")
        return sample


class UltraFeedbackRankedHandler(RankedHandler):
    """UltraFeedback's raw rows: ``instruction`` and ``completions``, each a dict with
    ``response`` and a number under ``score_field`` (default ``overall_score``)."""

    name = "ultrafeedback_ranked"
    keys = ("instruction", "completions", "system")
    score_field: ClassVar[str] = "overall_score"

    def extract(self, record: dict[str, Any]) -> RankedRecord:  # type: ignore[override]
        prompt = _messages(self.get(record, "instruction"), "instruction", default_role="user")
        completions = _maybe_json(self.get(record, "completions"))
        if not isinstance(completions, list) or not all(isinstance(c, dict) for c in completions):
            raise RecordError("malformed_record", "completions must be a list of objects")
        responses, scores = [], []
        for i, completion in enumerate(completions):
            if completion.get("response") is None:
                raise RecordError("missing_key", f"completions[{i}] has no response")
            if completion.get(self.score_field) is None:
                raise RecordError("score_count", f"completions[{i}] has no {self.score_field}")
            responses.append(completion["response"])
            scores.append(_to_float(completion[self.score_field], f"completions[{i}].{self.score_field}"))
        return RankedRecord(_with_system(prompt, self.get(record, "system", required=False)), responses, scores)


RANKED_HANDLERS: dict[str, type[RankedHandler]] = {
    cls.name: cls for cls in (RankedHandler, UltraFeedbackRankedHandler)
}
