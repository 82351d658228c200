"""Multi-attribute reward models (``training.objective: regression``): every
attribute the head predicts, and the scalar reward made from them.

A regression head (``model.num_labels`` > 1, e.g. HelpSteer2's helpfulness,
correctness, coherence, complexity, verbosity) gives one value per attribute; the
scalar reward is ``sum_a w_a * value_a`` with the weights ``--attribute-weights
helpfulness=0.65,correctness=0.8,...`` (SteerLM's combination). An attribute left
out of ``--attribute-weights`` weighs 0; without the option every attribute
weighs 1. A one-label reward model has no attributes: its value is the reward.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from megarm.errors import ScoringError


@dataclass(frozen=True)
class Attributes:
    """The head's attribute names (``None``: a one-label reward model) and the
    weights of the scalar reward."""

    names: tuple[str, ...] | None = None
    weights: tuple[float, ...] | None = None

    def reward(self, value: float | list[float]) -> float:
        """The scalar reward of one sequence's head output."""
        if not isinstance(value, list):
            return float(value)
        weights = self.weights or (1.0,) * len(value)
        return float(sum(w * v for w, v in zip(weights, value, strict=True)))

    def named(self, value: float | list[float]) -> dict[str, float] | None:
        """``{attribute: value}`` of one sequence (``None`` for a one-label model)."""
        if self.names is None or not isinstance(value, list):
            return None
        return dict(zip(self.names, (float(v) for v in value), strict=True))


def parse_attribute_weights(text: str | None, names: tuple[str, ...] | None) -> Attributes:
    """:class:`Attributes` of a head with attributes ``names`` from
    ``--attribute-weights`` (``name=weight,...``); raises :class:`ScoringError`
    naming the option for an unknown attribute, a bad number, or weights given to
    a one-label model."""
    if not text:
        return Attributes(names)
    if names is None:
        raise ScoringError("--attribute-weights is for a multi-attribute (regression) model; "
                           "this model has one label")
    weights = dict.fromkeys(names, 0.0)
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in weights:
            raise ScoringError(
                f"--attribute-weights {text!r}: {part!r} is not NAME=WEIGHT with NAME one of "
                f"{', '.join(names)}"
            )
        try:
            weights[name] = float(value)
        except ValueError:
            raise ScoringError(f"--attribute-weights {text!r}: {value!r} is not a number") from None
        if not math.isfinite(weights[name]):
            raise ScoringError(f"--attribute-weights {text!r}: {name} is not finite")
    return Attributes(names, tuple(weights[n] for n in names))


def evaluate_labelled(
    path: str, encoder: Any, outputs: Callable[[list[list[int]]], list[Any]],
    names: tuple[str, ...] | None, handler_name: str = "regression",
) -> dict[str, Any]:
    """``megarm.evaluate --format labelled``: a multi-attribute model on a labelled
    file (``--handler-name regression`` for ``{prompt, response, labels}``, or
    ``helpsteer2``), each record encoded as preprocessing encodes it. Metrics per
    attribute: ``rmse/<name>`` and ``pearson/<name>`` over the records that have the
    label, and ``labelled/<name>`` (their count)."""
    import torch

    from megarm.data.handlers import get_handler
    from megarm.data.readers import iter_records, resolve_inputs
    from megarm.rewards.benchmarks import EvaluateError

    if names is None:
        raise EvaluateError("--format labelled needs a multi-attribute (regression) model; "
                            "this model has one label")
    handler = get_handler(handler_name)
    if handler.kind != "regression":
        raise EvaluateError(f"--format labelled reads regression records: --handler-name "
                            f"regression or helpsteer2, not {handler_name}")
    handler.set_labels(list(names), None)  # type: ignore[attr-defined]
    rows, targets, indexes, skipped = [], [], [], []
    for raw, result in encoder.pairs(iter_records(resolve_inputs(path)), handler):
        if result[0] == "ok":
            rows.append(result[1].tolist() + result[2].tolist())
            targets.append([float(v) for v in result[4]])
            indexes.append(raw.index)
        else:
            skipped.append({"index": raw.index, "reason": result[1], "detail": result[2]})
    if not rows:
        raise EvaluateError(f"--data {path}: no record could be scored; first: {skipped[:1]}")
    predicted = torch.tensor(outputs(rows), dtype=torch.float64)
    labels = torch.tensor(targets, dtype=torch.float64)
    metrics: dict[str, Any] = {}
    for a, name in enumerate(names):
        known = torch.isfinite(labels[:, a])
        p, y = predicted[known, a], labels[known, a]
        n = int(known.sum())
        metrics[f"rmse/{name}"] = float(((p - y) ** 2).mean().sqrt()) if n else math.nan
        dp, dy = p - p.mean(), y - y.mean()
        spread = float((dp * dp).sum() * (dy * dy).sum())
        metrics[f"pearson/{name}"] = float((dp * dy).sum()) / math.sqrt(spread) if spread > 0 else math.nan
        metrics[f"labelled/{name}"] = float(n)
    return {
        "format": "labelled",
        "data": str(path),
        "convention": encoder.convention,
        "scored": len(rows),
        "metrics": metrics,
        "skipped": skipped,
        "records": [{"index": i, "attributes": dict(zip(names, p, strict=True))}
                    for i, p in zip(indexes, predicted.tolist(), strict=True)],
    }
