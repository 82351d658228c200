"""Regression records (issue #28): one response with per-attribute scores, for the
multi-attribute regression objective (:mod:`megarm.training.objectives.regression`).

Two handlers: ``regression`` reads ``{prompt, response, labels: {name: value}}``
(prompt as text or messages, optional ``system``; the attribute names and their
order come from ``--label-names``), ``helpsteer2`` reads nvidia/HelpSteer2's
per-response rows (``prompt``, ``response`` and the five 0-4 attributes
``helpfulness, correctness, coherence, complexity, verbosity`` as columns). A
label that is absent or null is *missing* (stored as NaN, masked in the loss);
a record is rejected with a reason when a label is not a number or NaN
(``malformed_record``), lies outside ``--label-range`` (``label_range``), or
when it has no label at all (``missing_key``).

Preprocessing writes ``<prefix>_packed_{input_ids,labels}`` (one sequence per
record, the response supervised) and ``<prefix>_packed_targets`` (one document of
``num_labels`` float32 per record); stats.json has ``kind: regression`` and
``label_names``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from megarm.data.handlers import (
    Handler,
    Messages,
    RecordError,
    _helpsteer_prompt,
    _messages,
    _text,
    _with_system,
)

HELPSTEER2_ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")


@dataclass
class RegressionRecord:
    """One prompt, one response and its attribute labels (``None``: missing)."""

    prompt: Messages
    response: str
    labels: list[float | None]


def _label(value: Any, name: str, low: float | None, high: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise RecordError("malformed_record", f"label {name}={value!r} is not a number")
    try:
        number = float(value)
    except ValueError:
        raise RecordError("malformed_record", f"label {name}={value!r} is not a number") from None
    if not math.isfinite(number):
        raise RecordError("malformed_record", f"label {name} is {number}")
    if (low is not None and number < low) or (high is not None and number > high):
        raise RecordError("label_range", f"label {name}={number} is outside [{low}, {high}]")
    return number


class RegressionHandler(Handler):
    """``{prompt, response, labels: {name: value}}``; optional ``system``."""

    name = "regression"
    kind = "regression"
    keys = ("prompt", "response", "labels", "system")
    default_label_names: ClassVar[tuple[str, ...]] = ()
    default_label_range: ClassVar[tuple[float, float] | None] = None

    def __init__(self, map_keys: dict[str, Any] | None = None, margin: str | list[str] | None = None) -> None:
        if margin is not None or (map_keys and "margin" in map_keys):
            raise ValueError(f"handler {self.name} reads no margin; drop --margin")
        super().__init__(map_keys)
        self.label_names: tuple[str, ...] = self.default_label_names
        self.label_range = self.default_label_range

    def set_labels(self, names: list[str] | None, label_range: list[float] | None) -> None:
        """``--label-names`` (required unless the handler has defaults) and
        ``--label-range LOW HIGH``; raises ``ValueError`` naming the option."""
        if names:
            if len(set(names)) != len(names) or not all(n.strip() for n in names):
                raise ValueError(f"--label-names {names}: give distinct, non-empty names")
            self.label_names = tuple(names)
        if not self.label_names:
            raise ValueError(
                f"handler {self.name} needs --label-names, the attributes in order "
                "(e.g. --label-names helpfulness,correctness)"
            )
        if label_range is not None:
            if len(label_range) != 2 or not label_range[0] < label_range[1]:
                raise ValueError(f"--label-range {label_range}: give LOW HIGH with LOW < HIGH")
            self.label_range = (float(label_range[0]), float(label_range[1]))

    def raw_labels(self, record: dict[str, Any]) -> dict[str, Any]:
        """Attribute name -> raw value (absent names are missing labels)."""
        labels = self.get(record, "labels")
        if not isinstance(labels, dict):
            raise RecordError("malformed_record", "labels must be an object {name: value}")
        return labels

    def extract(self, record: dict[str, Any]) -> RegressionRecord:  # type: ignore[override]
        prompt = _messages(self.get(record, "prompt"), "prompt", default_role="user")
        raw = self.raw_labels(record)
        low, high = self.label_range if self.label_range is not None else (None, None)
        labels = [_label(raw.get(name), name, low, high) for name in self.label_names]
        if all(value is None for value in labels):
            raise RecordError("missing_key", f"no label among {', '.join(self.label_names)}")
        return RegressionRecord(
            _with_system(prompt, self.get(record, "system", required=False)),
            self.get(record, "response"),
            labels,
        )

    def __call__(self, record: dict[str, Any]) -> RegressionRecord:  # type: ignore[override]
        sample = self.extract(record)
        _text(sample.response, "response")
        if not sample.prompt:
            raise RecordError("malformed_record", "the prompt has no messages")
        return sample


class HelpSteer2Handler(RegressionHandler):
    """nvidia/HelpSteer2 per-response rows: ``prompt``, ``response`` and the five
    attributes (0-4) as columns; multi-turn prompts in HelpSteer2's
    ``<extra_id_1>`` turn format become messages."""

    name = "helpsteer2"
    keys = ("prompt", "response", "system", *HELPSTEER2_ATTRIBUTES)
    default_label_names = HELPSTEER2_ATTRIBUTES
    default_label_range = (0.0, 4.0)

    def raw_labels(self, record: dict[str, Any]) -> dict[str, Any]:
        return {name: record.get(self.mapping.get(name, name) or "") for name in self.label_names}

    def extract(self, record: dict[str, Any]) -> RegressionRecord:  # type: ignore[override]
        prompt = self.get(record, "prompt")
        if not isinstance(prompt, str):
            raise RecordError("malformed_record", "prompt must be text")
        sample = super().extract({**record, self.mapping["prompt"]: prompt})
        sample.prompt = _with_system(
            _helpsteer_prompt(prompt), self.get(record, "system", required=False)
        )
        return sample


REGRESSION_HANDLERS: dict[str, type[RegressionHandler]] = {
    cls.name: cls for cls in (RegressionHandler, HelpSteer2Handler)
}
