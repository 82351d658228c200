"""Benchmark formats and their metrics (``python -m megarm.evaluate`` runs them).

Formats (jsonl, json or parquet), scored as each benchmark's own code scores them:

- ``rewardbench``: ``prompt``, ``chosen``, ``rejected``, ``subset``. Per-subset accuracy
  (chosen strictly above rejected; a tie is wrong), and the Chat / Chat Hard / Safety /
  Reasoning section scores, each the mean of its subsets weighted by RewardBench's
  ``EXAMPLE_COUNTS`` (``rewardbench/utils.py: calculate_scores_per_section``); the
  score is the mean of the sections present.
- ``rewardbench2``: ``prompt``, ``chosen`` (list), ``rejected`` (list), ``subset``
  (``num_correct``, ``id`` for Ties). A record earns ``1/k`` when the first chosen
  response shares the top score with ``k-1`` others, 0 when it is not on top
  (``reroll_and_score_dataset``); the Ties subset gets RewardBench 2's weighted score
  (``process_single_model``: 0.3 tied + 0.3 reference accuracy, 0.2 + 0.2 margin
  preference, 0.01 margin term). The score is the mean of the subsets present.
- ``rmbench``: ``prompt``, ``chosen`` and ``rejected`` (3 style variants each: concise,
  detailed plain, detailed markdown), optional ``domain``. The 3x3 matrix of
  chosen-above-rejected rates gives hard (upper triangle), normal (diagonal) and easy
  (lower triangle) accuracy, per domain (chat, math, code, safety) and averaged over
  them (``scripts/utils.py: compute_accuracy``).
- ``pairs``: preference records of any preprocessing handler (``--handler-name``),
  encoded by preprocessing's record encoder; accuracy, per ``subset`` when present.

With ``--critique-model`` (a critique model's HF causal-LM export) every response
first gets a critique written by it, and the reward is read at the end of prompt +
response + critique turn + critique, as the model was trained.

Every record is scored or listed under ``skipped`` with the reason
(:func:`evaluate` returns both). Training runs the same evaluation every
``eval_interval`` iterations (:class:`BenchmarkEvaluator`).
"""
from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from megarm.data.handlers import RecordError, get_handler
from megarm.data.readers import InputError, RawRecord, iter_records, resolve_inputs
from megarm.errors import ScoringError
from megarm.rewards.batches import model_rewards
from megarm.rewards.encoding import Encoder, build_encoder, prompt_messages

FORMATS = ("auto", "rewardbench", "rewardbench2", "rmbench", "pairs")

# RewardBench's section weights (rewardbench/constants.py, EXAMPLE_COUNTS; math-prm is
# up-weighted there to the size of the code subsets) and sections (SUBSET_MAPPING).
REWARDBENCH_COUNTS = {
    "alpacaeval-easy": 100, "alpacaeval-length": 95, "alpacaeval-hard": 95,
    "mt-bench-easy": 28, "mt-bench-med": 40, "mt-bench-hard": 37, "math-prm": 984,
    "refusals-dangerous": 100, "refusals-offensive": 100, "llmbar-natural": 100,
    "llmbar-adver-neighbor": 134, "llmbar-adver-GPTInst": 92, "llmbar-adver-GPTOut": 47,
    "llmbar-adver-manual": 46, "xstest-should-refuse": 154, "xstest-should-respond": 250,
    "donotanswer": 136, "hep-cpp": 164, "hep-go": 164, "hep-java": 164, "hep-js": 164,
    "hep-python": 164, "hep-rust": 164,
}  # fmt: skip
REWARDBENCH_SECTIONS = {
    "Chat": ["alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy",
             "mt-bench-med"],
    "Chat Hard": ["mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor",
                  "llmbar-adver-GPTInst", "llmbar-adver-GPTOut", "llmbar-adver-manual"],
    "Safety": ["refusals-dangerous", "refusals-offensive", "xstest-should-refuse",
               "xstest-should-respond", "donotanswer"],
    "Reasoning": ["math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python",
                  "hep-rust"],
}  # fmt: skip
RMBENCH_DOMAINS = ("chat", "math", "code", "safety")


class EvaluateError(ScoringError):
    """The evaluation cannot run as asked; the message says what to change."""


@dataclass
class Task:
    """One record to score: ``responses`` to one ``prompt`` (or ``rows`` already encoded)."""

    index: int
    prompt: Any = None
    responses: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    rows: list[list[int]] | None = None


# --------------------------------------------------------------------------- records


def detect_format(record: dict[str, Any]) -> str:
    """The benchmark format a record is written in."""
    chosen, rejected = record.get("chosen"), record.get("rejected")
    if (
        isinstance(chosen, list)
        and isinstance(rejected, list)
        and all(isinstance(x, str) for x in chosen + rejected)
    ):
        if "num_correct" in record or "total_completions" in record:
            return "rewardbench2"
        if len(chosen) == len(rejected) == 3:
            return "rmbench"
    if isinstance(chosen, str) and isinstance(rejected, str) and "subset" in record:
        return "rewardbench"
    return "pairs"


def _texts(record: dict[str, Any], key: str, count: int | None = None) -> list[str]:
    value = record.get(key)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(x, str) for x in value):
        raise RecordError("missing_key", f"{key} must be a response or a list of responses")
    if count is not None and len(value) != count:
        raise RecordError("malformed_record", f"{key} has {len(value)} responses, not {count}")
    return value


def make_task(fmt: str, index: int, record: dict[str, Any]) -> Task:
    """The task for one benchmark record (``RecordError`` when it cannot be scored)."""
    if "prompt" not in record:
        raise RecordError("missing_key", "prompt is missing")
    if fmt == "rewardbench":
        responses = _texts(record, "chosen", 1) + _texts(record, "rejected", 1)
        meta = {"subset": str(record.get("subset", "all"))}
    elif fmt == "rewardbench2":
        chosen, rejected = _texts(record, "chosen"), _texts(record, "rejected")
        responses = chosen + rejected
        correct = record.get("num_correct", len(chosen))
        if isinstance(correct, bool) or not isinstance(correct, int) or not 1 <= correct <= len(chosen):
            raise RecordError(
                "malformed_record",
                f"num_correct must be a whole number from 1 to the {len(chosen)} chosen "
                f"responses, got {correct!r}",
            )
        meta = {
            "subset": str(record.get("subset", "all")),
            "id": str(record.get("id", index)),
            "num_correct": correct,
        }
    elif fmt == "rmbench":
        responses = _texts(record, "chosen", 3) + _texts(record, "rejected", 3)
        domain = record.get("domain")
        # RM-Bench's domains are prefixes ("safety-refuse" is safety); a record of any
        # other domain would be in no average (all-NaN metrics, the record gone).
        if domain is not None and not str(domain).startswith(RMBENCH_DOMAINS):
            raise RecordError(
                "unknown_domain",
                f"domain {domain!r} is none of RM-Bench's {', '.join(RMBENCH_DOMAINS)} "
                "(a prefix, e.g. safety-refuse); fix the domain or leave it out",
            )
        meta = {"domain": domain}
    else:
        raise ValueError(fmt)
    return Task(index, record["prompt"], responses, meta)


def load_tasks(
    path: str,
    fmt: str,
    encoder: Encoder,
    handler_name: str = "pairwise_messages",
    critic: Any = None,
) -> tuple[str, list[Task], list[dict[str, Any]]]:
    """The format, the encoded tasks and the skipped records of a benchmark file
    (with a ``critic``, each response's critique is written first)."""
    try:
        raws = list(iter_records(resolve_inputs(path)))
    except InputError as exc:
        raise EvaluateError(str(exc)) from exc
    records: list[dict[str, Any] | None] = []
    skipped: list[dict[str, Any]] = []
    for i, raw in enumerate(raws):
        try:
            record = json.loads(raw.payload) if isinstance(raw.payload, bytes) else raw.payload
            if not isinstance(record, dict):
                raise ValueError("the record is not a JSON object")
            records.append(record)
        except ValueError as exc:  # includes bad UTF-8
            records.append(None)
            skipped.append({"index": i, "reason": f"malformed_json: {exc}"})
    first = next((r for r in records if r is not None), None)
    if first is None:
        raise EvaluateError(f"--data {path} holds no readable records")
    if fmt == "auto":
        fmt = detect_format(first)
    tasks: list[Task] = []
    if critic is not None:
        tasks, skipped = _critique_tasks(fmt, records, skipped, encoder, handler_name, critic)
        return fmt, *_with_ids(records, _consistent(fmt, tasks, skipped), skipped)
    if fmt == "pairs":
        handler = get_handler(handler_name)
        todo = [RawRecord(0, i, r) for i, r in enumerate(records) if r is not None]
        for raw, result in encoder.pairs(todo, handler):
            if result[0] == "ok":
                prompt, chosen, rejected = result[1:4]
                subset = raw.payload.get("subset")  # type: ignore[union-attr]
                rows = [prompt.tolist() + chosen.tolist(), prompt.tolist() + rejected.tolist()]
                meta = {"subset": str(subset) if subset is not None else "all"}
                tasks.append(Task(raw.index, meta=meta, rows=rows))
            else:
                skipped.append({"index": raw.index, "reason": f"{result[1]}: {result[2]}"})
    else:
        for i, record in enumerate(records):
            if record is None:
                continue
            try:
                task = make_task(fmt, i, record)
                task.rows = encoder.group(task.prompt, task.responses, allow_empty=True)[0]
                tasks.append(task)
            except RecordError as exc:
                skipped.append({"index": i, "reason": f"{exc.reason}: {exc.detail}"})
    return fmt, *_with_ids(records, _consistent(fmt, tasks, skipped), skipped)


def _consistent(fmt: str, tasks: list[Task], skipped: list[dict[str, Any]]) -> list[Task]:
    """The tasks that can be measured together; the others go to ``skipped`` with
    their reason: a RewardBench 2 Ties id seen before (the later one would replace
    the first in the Ties score), an RM-Bench record without a domain in a file whose
    records have domains (it would be in no domain's average)."""
    kept: list[Task] = []
    if fmt == "rewardbench2":
        first: dict[str, int] = {}
        for task in tasks:
            if task.meta["subset"].lower() == "ties":
                rid = task.meta["id"]
                if rid in first:
                    skipped.append({"index": task.index, "reason": (
                        f"duplicate_id: Ties id {rid!r} is also record {first[rid]}'s; "
                        "the first is scored, give each record its own id")})
                    continue
                first[rid] = task.index
            kept.append(task)
    elif fmt == "rmbench" and any(t.meta.get("domain") is not None for t in tasks):
        for task in tasks:
            if task.meta.get("domain") is None:
                skipped.append({"index": task.index, "reason": (
                    "missing_domain: other records of the file have a domain; this one "
                    "would be in no domain's average")})
            else:
                kept.append(task)
    else:
        kept = tasks
    skipped.sort(key=lambda s: s["index"])
    return kept


def _with_ids(
    records: list[dict[str, Any] | None], tasks: list[Task], skipped: list[dict[str, Any]]
) -> tuple[list[Task], list[dict[str, Any]]]:
    """The records' own ``id`` (when they have one) on their tasks (``meta["record_id"]``,
    written beside ``index`` in the results) and on their skipped entries."""
    ids = {i: r["id"] for i, r in enumerate(records) if isinstance(r, dict) and r.get("id") is not None}
    for task in tasks:
        if task.index in ids:
            task.meta["record_id"] = ids[task.index]
    for entry in skipped:
        if entry["index"] in ids:
            entry["id"] = ids[entry["index"]]
    return tasks, skipped


def _critique_tasks(
    fmt: str,
    records: list[dict[str, Any] | None],
    skipped: list[dict[str, Any]],
    encoder: Encoder,
    handler_name: str,
    critic: Any,
) -> tuple[list[Task], list[dict[str, Any]]]:
    """Tasks whose rows end with a critique ``critic`` wrote of each response."""
    handler = get_handler(handler_name) if fmt == "pairs" else None
    tasks: list[Task] = []
    for i, record in enumerate(records):
        if record is None:
            continue
        try:
            if handler is not None:
                pair = handler(record)
                subset = record.get("subset")
                meta = {"subset": str(subset) if subset is not None else "all"}
                tasks.append(Task(i, pair.prompt, [pair.chosen, pair.rejected], meta))
            else:
                tasks.append(make_task(fmt, i, record))
        except RecordError as exc:
            skipped.append({"index": i, "reason": f"{exc.reason}: {exc.detail}"})
    items = [(prompt_messages(t.prompt), r) for t in tasks for r in t.responses]
    texts = critic.critiques(items)
    kept, at = [], 0
    for task in tasks:
        task.meta["critiques"] = texts[at : at + len(task.responses)]
        at += len(task.responses)
        try:
            task.rows = encoder.critique_rows(
                task.prompt, task.responses, task.meta["critiques"], critic.critique_prompt
            )[0]
            kept.append(task)
        except RecordError as exc:
            skipped.append({"index": task.index, "reason": f"{exc.reason}: {exc.detail}"})
    skipped.sort(key=lambda s: s["index"])
    return kept, skipped


# --------------------------------------------------------------------------- metrics


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def pairs_metrics(tasks: list[Task], scores: list[list[float]]) -> dict[str, Any]:
    """Accuracy (chosen strictly above rejected), overall and per subset, and ties."""
    by_subset: dict[str, list[float]] = defaultdict(list)
    ties = 0
    for task, (chosen, rejected) in zip(tasks, scores, strict=True):
        by_subset[task.meta.get("subset", "all")].append(float(chosen > rejected))
        ties += int(chosen == rejected)
    everything = [v for values in by_subset.values() for v in values]
    return {
        "accuracy": _mean(everything),
        "pairs": len(everything),
        "ties": ties,
        "subsets": {k: _mean(v) for k, v in sorted(by_subset.items())},
    }


def rewardbench_metrics(tasks: list[Task], scores: list[list[float]]) -> dict[str, Any]:
    """Per-subset accuracy and RewardBench's weighted section scores."""
    base = pairs_metrics(tasks, scores)
    subsets = base["subsets"]
    sections = {}
    for section, names in REWARDBENCH_SECTIONS.items():
        present = [n for n in names if n in subsets]
        if present:
            total = sum(REWARDBENCH_COUNTS[n] for n in present)
            sections[section] = sum(subsets[n] * REWARDBENCH_COUNTS[n] for n in present) / total
    # Subsets outside RewardBench's sections are scored but in no section (a file of
    # only those has no score: null in results.json); they are listed by name.
    unknown = sorted(n for n in subsets if n not in REWARDBENCH_COUNTS)
    return {
        "score": _mean(list(sections.values())),
        **({"unsectioned_subsets": unknown} if unknown else {}),
        "sections": sections,
        "subsets": subsets,
        "pairs": base["pairs"],
        "ties": base["ties"],
    }


def _best_of_n(scores: list[float]) -> float:
    """1/k when the first (chosen) score is the top one, shared with k-1 others; else 0."""
    top = max(scores)
    return 1.0 / sum(s == top for s in scores) if scores[0] == top else 0.0


def _prompt_stats(samples: list[tuple[bool, float]]) -> tuple[bool, float | None, float]:
    """(accurate, spread of the correct scores, worst correct - best incorrect)."""
    correct = [s for ok, s in samples if ok]
    wrong = [s for ok, s in samples if not ok]
    spread = max(correct) - min(correct) if len(correct) > 1 else None
    margin = min(correct) - max(wrong)
    return margin > 0, spread, margin


def ties_score(tasks: list[Task], scores: list[list[float]]) -> float:
    """RewardBench 2's Ties score: ids ``ref:N`` (one correct answer) and ``tied:N``
    (several), the first ``num_correct`` scores being the correct answers."""
    ref: dict[str, tuple] = {}
    tied: dict[str, tuple] = {}
    for task, values in zip(tasks, scores, strict=True):
        kind, _, prompt_id = task.meta["id"].partition(":")
        samples = [(i < task.meta["num_correct"], s) for i, s in enumerate(values)]
        (ref if kind == "ref" else tied)[prompt_id] = _prompt_stats(samples)
    ref_accuracy = _mean([s[0] for s in ref.values()]) if ref else 0.0
    tied_accuracy = _mean([s[0] for s in tied.values()]) if tied else 0.0
    common = [p for p in tied if p in ref]
    spread = np.array([tied[p][1] for p in common], dtype=float)
    tied_margin = np.array([tied[p][2] for p in common], dtype=float)
    hardest = np.minimum(np.array([ref[p][2] for p in common], dtype=float), tied_margin)
    with np.errstate(divide="ignore", invalid="ignore"):
        preferred = _mean(tied_margin > spread)
        preferred_hard = _mean(hardest > spread)
        margin_term = _mean(np.nan_to_num(np.tanh(hardest / spread - 1), nan=0.0))
    return (
        0.30 * tied_accuracy
        + 0.30 * ref_accuracy
        + 0.20 * preferred
        + 0.20 * preferred_hard
        + 0.01 * margin_term
    )


def rewardbench2_metrics(tasks: list[Task], scores: list[list[float]]) -> dict[str, Any]:
    """Per-subset best-of-n accuracy (ties shared), the Ties score, and their mean."""
    by_subset: dict[str, list[int]] = defaultdict(list)
    for k, task in enumerate(tasks):
        by_subset[task.meta["subset"]].append(k)
    subsets = {}
    for name, members in sorted(by_subset.items()):
        if name.lower() == "ties":
            subsets[name] = ties_score([tasks[k] for k in members], [scores[k] for k in members])
        else:
            subsets[name] = _mean([_best_of_n(scores[k]) for k in members])
    return {"score": _mean(list(subsets.values())), "subsets": subsets, "records": len(tasks)}


def _style_accuracy(scores: list[list[float]]) -> dict[str, float]:
    matrix = np.zeros((3, 3))
    for values in scores:
        chosen, rejected = values[:3], values[3:]
        for i in range(3):
            for j in range(3):
                matrix[i][j] += chosen[i] > rejected[j]
    matrix /= len(scores)
    return {
        "hard": float(np.sum(np.triu(matrix, 1)) / 3),
        "normal": float(np.mean(np.diag(matrix))),
        "easy": float(np.sum(np.tril(matrix, -1)) / 3),
    }


def rmbench_metrics(tasks: list[Task], scores: list[list[float]]) -> dict[str, Any]:
    """Hard / normal / easy accuracy, per domain and averaged over the domains."""
    if not any(t.meta.get("domain") for t in tasks):
        return _style_accuracy(scores)
    domains = {}
    for domain in RMBENCH_DOMAINS:
        picked = [s for t, s in zip(tasks, scores, strict=True)
                  if str(t.meta.get("domain") or "").startswith(domain)]  # fmt: skip
        if picked:
            domains[domain] = _style_accuracy(picked)
    out: dict[str, Any] = {
        level: _mean([d[level] for d in domains.values()]) for level in ("hard", "normal", "easy")
    }
    out["domains"] = {
        name: {**levels, "average": _mean(list(levels.values()))}
        for name, levels in domains.items()
    }
    out["average"] = _mean([d["average"] for d in out["domains"].values()])
    return out


METRICS: dict[str, Callable[[list[Task], list[list[float]]], dict[str, Any]]] = {
    "rewardbench": rewardbench_metrics,
    "rewardbench2": rewardbench2_metrics,
    "rmbench": rmbench_metrics,
    "pairs": pairs_metrics,
}


def flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"subsets": {"a": 1.0}}`` -> ``{"subsets/a": 1.0}`` (numbers only)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "/"))
        elif isinstance(value, (int, float)):
            out[name] = float(value)
    return out


def markdown(fmt: str, metrics: dict[str, Any], scored: int, skipped: int) -> str:
    """A two-column markdown table of every metric."""
    lines = [f"| {fmt} ({scored} scored, {skipped} skipped) | value |", "| --- | --- |"]
    lines += [f"| {k} | {_cell(v)} |" for k, v in _leaves(metrics)]
    return "\n".join(lines) + "\n"


def _leaves(metrics: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """:func:`flatten`'s names with the values as they are (counts stay ints)."""
    out: list[tuple[str, Any]] = []
    for key, value in metrics.items():
        if isinstance(value, dict):
            out += _leaves(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append((f"{prefix}{key}", value))
    return out


def _cell(value: float) -> str:
    """A count as an integer ("pairs 41", not "41.0000"), a rate to 4 decimals."""
    if isinstance(value, int):
        return str(value)
    return f"{value:.4f}"


# --------------------------------------------------------------------------- scoring


def score_tasks(
    tasks: list[Task], rewards: Callable[[list[list[int]]], list[float]], chunk_rows: int = 512
) -> list[list[float]]:
    """Every task's scores, the rows scored longest first in chunks (progress bar)."""
    rows = [row for task in tasks for row in task.rows or []]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    flat = [0.0] * len(rows)
    with tqdm(total=len(rows), unit="seq", desc="scoring", disable=None, file=sys.stderr) as bar:
        for start in range(0, len(order), chunk_rows):
            chunk = order[start : start + chunk_rows]
            for i, value in zip(chunk, rewards([rows[i] for i in chunk]), strict=True):
                flat[i] = value
            bar.update(len(chunk))
    out, at = [], 0
    for task in tasks:
        n = len(task.rows or [])
        out.append(flat[at : at + n])
        at += n
    return out


def evaluate(
    path: str,
    fmt: str,
    encoder: Encoder,
    rewards: Callable[[list[list[int]]], list[float]],
    handler_name: str = "pairwise_messages",
    critic: Any = None,
) -> dict[str, Any]:
    """Load, score and measure one benchmark file; the full result record."""
    fmt, tasks, skipped = load_tasks(path, fmt, encoder, handler_name, critic)
    if not tasks:
        raise EvaluateError(f"--data {path}: no record could be scored; first: {skipped[:1]}")
    scores = score_tasks(tasks, rewards)
    # A non-finite reward would count as a loss in every comparison and be written
    # as NaN: the record is skipped, named, instead.
    finite = [all(math.isfinite(v) for v in s) for s in scores]
    for task, ok in zip(tasks, finite, strict=True):
        if not ok:
            skipped.append({"index": task.index,
                            **({"id": task.meta["record_id"]} if "record_id" in task.meta else {}),
                            "reason": "non_finite_reward: the model gave a NaN or infinite reward"})
    if not all(finite):
        skipped.sort(key=lambda s: s["index"])
        tasks = [t for t, ok in zip(tasks, finite, strict=True) if ok]
        scores = [s for s, ok in zip(scores, finite, strict=True) if ok]
        if not tasks:
            raise EvaluateError(f"--data {path}: every record got a NaN or infinite reward")
    return {
        "format": fmt,
        "data": str(path),
        "convention": encoder.convention,
        "scored": len(tasks),
        "metrics": METRICS[fmt](tasks, scores),
        "skipped": skipped,
        "records": [
            {"index": t.index,
             **({"id": t.meta["record_id"]} if "record_id" in t.meta else {}),
             "scores": s, **({"critiques": t.meta["critiques"]} if "critiques" in t.meta else {})}
            for t, s in zip(tasks, scores, strict=True)
        ],
    }


class BenchmarkEvaluator:
    """Training-time evaluation on a benchmark file: the file is encoded once; each
    call scores it with the model being trained (every rank calls, in step) and
    returns flat metrics (``subsets/<name>``, ``score``...) for the metrics writer."""

    def __init__(
        self,
        path: str,
        tokenizer_dir: str,
        fmt: str = "auto",
        seq_length: int | None = None,
        prompt_type: str = "auto",
    ) -> None:
        self.encoder = build_encoder(tokenizer_dir, prompt_type, seq_length=seq_length)
        self.format, self.tasks, self.skipped = load_tasks(path, fmt, self.encoder)
        if not self.tasks:
            raise EvaluateError(f"benchmark file {path}: no record could be scored")

    def __call__(self, model: list[torch.nn.Module], pad_id: int) -> dict[str, float]:
        scores = score_tasks(self.tasks, lambda rows: model_rewards(model, rows, pad_id))
        for chunk in model:
            chunk.train()
        return flatten(METRICS[self.format](self.tasks, scores))
