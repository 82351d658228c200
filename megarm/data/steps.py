"""Step-labelled solutions (issue #29): records for process reward models (PRMs).

Two handlers:

- ``prm_steps`` reads PRM800K-style ``{prompt, steps: [...], labels: [...]}``
  (prompt as text or messages, optional ``system``);
- ``math_shepherd`` reads Math-Shepherd's ``{input, label}``: ``input`` is the
  question followed by the solution (from its first ``Step 1:``), each step ended by
  a tag (``--step-tag``, default ``ки``); ``label`` is the same text with every tag
  replaced by ``+`` or ``-``.

Labels (``--step-labels``): ``hard`` (default) accepts ``+``/``-``, ``1``/``-1``,
``true``/``false`` and PRM800K's neutral ``0`` (mapped by ``--neutral-label``:
``positive``, the default, ``negative``, or ``reject``); ``soft`` accepts a number in
[0, 1]. A hard label is stored as 1.0 (good step) or 0.0 (bad step).

Each step is tokenized on its own and followed by the step-end marker token
(``--step-marker``, one token of the tokenizer; default ``"\\n\\n"``), so a step's
reward is read exactly at the marker whatever the step text tokenizes to. A record
is rejected with a reason when it has no step (``no_steps``), a step holds the
marker text itself (``marker_in_step``: it would split differently when scored from
text), the label count differs from the step count (``step_label_count``) or a label
is not one the label type accepts (``unknown_label``).

Preprocessing writes ``<prefix>_packed_{input_ids,labels}`` (one sequence per
record, the solution supervised), ``<prefix>_packed_step_positions`` (int32, the
marker positions of each record's row) and ``<prefix>_packed_step_targets``
(float32, one label per position); stats.json has ``kind: prm`` and ``step_marker``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from megarm.data.handlers import Handler, Messages, RecordError, _messages, _text, _with_system

DEFAULT_STEP_MARKER = "\n\n"
DEFAULT_STEP_TAG = "ки"
STEP_LABEL_TYPES = ("hard", "soft")
NEUTRAL_LABELS = ("positive", "negative", "reject")
_HARD = {"+": 1.0, "-": 0.0, True: 1.0, False: 0.0}


@dataclass
class StepRecord:
    """One prompt, its solution as steps, and one label per step (1.0 good, 0.0 bad;
    soft labels anywhere in [0, 1])."""

    prompt: Messages
    steps: list[str]
    labels: list[float]


class StepHandler(Handler):
    """``{prompt, steps: [...], labels: [...]}``; optional ``system``."""

    name = "prm_steps"
    kind = "prm"
    keys = ("prompt", "steps", "labels", "system")

    def __init__(self, map_keys: dict[str, Any] | None = None, margin: str | list[str] | None = None) -> None:
        if margin is not None or (map_keys and "margin" in map_keys):
            raise ValueError(f"handler {self.name} reads no margin; drop --margin")
        super().__init__(map_keys)
        self.step_marker = DEFAULT_STEP_MARKER
        self.step_tag = DEFAULT_STEP_TAG
        self.label_type = "hard"
        self.neutral = "positive"

    def set_steps(
        self,
        marker: str | None,
        label_type: str | None,
        neutral: str | None,
        tag: str | None = None,
    ) -> None:
        """``--step-marker``, ``--step-labels``, ``--neutral-label`` and ``--step-tag``;
        raises ``ValueError`` naming the option."""
        if marker is not None:
            if not marker:
                raise ValueError("--step-marker must not be empty")
            self.step_marker = marker
        if label_type is not None:
            if label_type not in STEP_LABEL_TYPES:
                raise ValueError(f"--step-labels {label_type!r}: choose from {STEP_LABEL_TYPES}")
            self.label_type = label_type
        if neutral is not None:
            if neutral not in NEUTRAL_LABELS:
                raise ValueError(f"--neutral-label {neutral!r}: choose from {NEUTRAL_LABELS}")
            self.neutral = neutral
        if tag is not None:
            if not tag:
                raise ValueError("--step-tag must not be empty")
            self.step_tag = tag

    def label(self, value: Any, step: int) -> float:
        """One step's label as a float target; ``unknown_label`` otherwise."""
        where = f"step {step + 1} label {value!r}"
        if self.label_type == "soft":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RecordError("unknown_label", f"{where} is not a number in [0, 1]")
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise RecordError("unknown_label", f"{where} is outside [0, 1]")
            return float(value)
        if isinstance(value, str):
            value = value.strip()
            if value in _HARD:
                return _HARD[value]
        elif isinstance(value, bool):
            return _HARD[value]
        elif isinstance(value, (int, float)) and value in (1, -1, 0):
            if value == 0:  # PRM800K's neutral step
                if self.neutral == "reject":
                    raise RecordError("unknown_label", f"{where} is neutral (--neutral-label reject)")
                return 1.0 if self.neutral == "positive" else 0.0
            return 1.0 if value == 1 else 0.0
        raise RecordError(
            "unknown_label",
            f"{where} is not one of +, -, 1, -1, 0, true, false (--step-labels soft for "
            "numbers in [0, 1])",
        )

    def extract(self, record: dict[str, Any]) -> StepRecord:  # type: ignore[override]
        prompt = _messages(self.get(record, "prompt"), "prompt", default_role="user")
        steps, labels = self.get(record, "steps"), self.get(record, "labels")
        if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
            raise RecordError("malformed_record", "steps must be a list of texts")
        if not isinstance(labels, list):
            raise RecordError("malformed_record", "labels must be a list, one per step")
        return StepRecord(
            _with_system(prompt, self.get(record, "system", required=False)), steps, labels
        )

    def __call__(self, record: dict[str, Any]) -> StepRecord:  # type: ignore[override]
        sample = self.extract(record)
        if not sample.prompt:
            raise RecordError("malformed_record", "the prompt has no messages")
        steps = [step.strip() for step in sample.steps]
        if not steps or not any(steps):
            raise RecordError("no_steps", "the solution has no step")
        if len(sample.labels) != len(steps):
            raise RecordError(
                "step_label_count", f"{len(sample.labels)} labels for {len(steps)} steps"
            )
        for i, step in enumerate(steps):
            _text(step, f"step {i + 1}")
            if self.step_marker in step:
                raise RecordError(
                    "marker_in_step",
                    f"step {i + 1} contains the step marker {self.step_marker!r}; choose another "
                    "--step-marker",
                )
        sample.steps = steps
        sample.labels = [self.label(value, i) for i, value in enumerate(sample.labels)]
        return sample


_FIRST_STEP = re.compile(r"Step\s*1\s*[:.]")


class MathShepherdHandler(StepHandler):
    """Math-Shepherd rows: ``input`` (question, then the solution from its first
    ``Step 1:``, each step ended by ``--step-tag``) and ``label`` (the same text with
    each tag replaced by ``+`` or ``-``)."""

    name = "math_shepherd"
    keys = ("input", "label", "system")

    def extract(self, record: dict[str, Any]) -> StepRecord:  # type: ignore[override]
        text, labelled = self.get(record, "input"), self.get(record, "label")
        if not isinstance(text, str) or not isinstance(labelled, str):
            raise RecordError("malformed_record", "input and label must be texts")
        tag = self.step_tag
        if tag not in text:
            raise RecordError("no_steps", f"input has no step tag {tag!r}")
        start = _FIRST_STEP.search(text)
        if start is None:
            raise RecordError("malformed_record", "input has no 'Step 1:' after the question")
        question = text[: start.start()].strip()
        if not question:
            raise RecordError("malformed_record", "input has no question before 'Step 1:'")
        pieces = text[start.start() :].split(tag)
        trailing = pieces.pop().strip()  # text after the last tag: an unlabelled step
        if trailing:
            raise RecordError(
                "step_label_count", f"text after the last {tag!r} has no label: {trailing[:40]!r}"
            )
        # ``label`` is ``input`` with each tag replaced by one character: the i-th tag
        # at position p of ``input`` is the label at p - i * (len(tag) - 1).
        labels, rebuilt, at = [], [], 0
        for i, piece in enumerate(pieces):
            at = text.index(tag, start.start() if i == 0 else at + len(tag))
            where = at - i * (len(tag) - 1)
            labels.append(labelled[where] if where < len(labelled) else "")
            rebuilt.append(piece + labels[-1])
        if text[: start.start()] + "".join(rebuilt) + text[at + len(tag) :] != labelled:
            raise RecordError(
                "step_label_count",
                f"label is not input with each {tag!r} replaced by one label character",
            )
        prompt = [{"role": "user", "content": question}]
        return StepRecord(
            _with_system(prompt, self.get(record, "system", required=False)), pieces, labels
        )


STEP_HANDLERS: dict[str, type[StepHandler]] = {
    cls.name: cls for cls in (StepHandler, MathShepherdHandler)
}
