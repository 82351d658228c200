"""Score responses with a trained megarm reward model (a checkpoint or an HF export).

    torchrun --nproc_per_node N -m megarm.score --load CKPT_OR_EXPORT --input FILE \\
        --output rewards.jsonl [--handler-name NAME] [--tensor-model-parallel-size T] \\
        [--pipeline-model-parallel-size P] [--max-batch-tokens K]

Input records (jsonl/json/parquet/csv/arrow, read by :mod:`megarm.data.readers`):

- preference pairs, encoded by preprocessing's own record encoder with the handler
  ``--handler-name`` (default ``pairwise_messages``); output ``chosen_reward`` /
  ``rejected_reward`` per record, and the pair accuracy (chosen scored higher) is
  printed;
- single responses ``{"prompt": str | messages, "response": str}`` (optional
  ``system``), or ``{"messages": [..., {"role": "assistant", ...}]}``; output ``reward``.

A multi-attribute (regression) model adds each sequence's attributes
(``attributes`` / ``chosen_attributes`` / ``rejected_attributes``); its ``reward`` is
their ``--attribute-weights`` combination (:mod:`megarm.rewards.attributes`).

Every sequence ends as the model's reward convention says (``<|im_end|>\\n`` for
ChatML, the end of ``apply_chat_template``'s output), see :mod:`megarm.rewards.encoding`.

A critique model (``--critique-model``, its HF causal-LM export; ``--load`` is its
reward head: the ``*ForSequenceClassification`` export or the megarm checkpoint)
first writes a critique of each response, then the reward is read at the end of
prompt + response + critique turn + critique; the output lines carry the critiques
(``chosen_critique`` / ``rejected_critique`` / ``critique``).
Rank 0 writes one line per input record, in input order (``{"index": i, "error":
...}`` for records it cannot score), to a temporary name renamed when complete. The
output may not be the input, and its directory is checked for writing before the
model is loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from megarm import cli
from megarm.data.handlers import RecordError, get_handler
from megarm.data.readers import InputError, RawRecord, iter_records, resolve_inputs
from megarm.errors import ScoringError
from megarm.rewards.backends import open_scorer
from megarm.rewards.batches import ScoreBatch, run_model
from megarm.rewards.encoding import Encoder, chat_messages, prompt_messages

__all__ = ["ScoreBatch", "ScoreError", "main", "run_model", "score"]


class ScoreError(ScoringError):
    """Scoring cannot start; the message says what to pass."""


@dataclass
class Item:
    """One input record after formatting: 1 row (single), 2 rows (pair) or an error."""

    index: int
    kind: str  # "pair" | "single" | "error"
    rows: list[list[int]] = field(default_factory=list)
    error: str | None = None
    critiques: list[str] | None = None
    record_id: Any = None
    """The record's own ``id`` when it has one (written beside ``index``)."""


def _record(payload: bytes | dict[str, Any]) -> dict[str, Any]:
    try:
        record = json.loads(payload) if isinstance(payload, (bytes, str)) else payload
    except ValueError as exc:  # includes bad UTF-8
        raise RecordError("malformed_json", str(exc)) from None
    if not isinstance(record, dict):
        raise RecordError("malformed_record", "the record is not a JSON object")
    return record


def critique_records(
    raws: list[RawRecord], encoder: Encoder, handler_name: str | None, map_keys: Any, critic: Any
) -> list[Item]:
    """Records -> items for a critique model: each response's critique is written by
    ``critic`` (:class:`megarm.generate.CritiqueWriter`), then the rows are prompt +
    response + critique turn + critique (:meth:`Encoder.critique_rows`)."""
    handler = get_handler(handler_name or "pairwise_messages", map_keys)
    items: list[Item] = []
    work: list[tuple[Item, Any, list[str]]] = []
    for i, raw in enumerate(raws):
        try:
            record = _record(raw.payload)
            if handler_name or "chosen" in record or "rejected" in record:
                pair = handler(record)
                kind, prompt, responses = "pair", pair.prompt, [pair.chosen, pair.rejected]
            elif "messages" in record:
                messages = chat_messages(record["messages"])
                if messages[-1]["role"] != "assistant":
                    raise RecordError("malformed_record", "the last message must be the response")
                kind, prompt, responses = "single", messages[:-1], [messages[-1]["content"]]
            else:
                if "response" not in record:
                    raise RecordError("missing_key", "response (or chosen/rejected) is missing")
                kind, prompt, responses = "single", prompt_messages(record.get("prompt")), [
                    record["response"]
                ]
            item = Item(i, kind)
            work.append((item, prompt_messages(prompt), responses))
        except RecordError as exc:
            item = Item(i, "error", error=f"{exc.reason}: {exc.detail}")
        items.append(item)
    texts = critic.critiques([(prompt, r) for _, prompt, responses in work for r in responses])
    at = 0
    for item, prompt, responses in work:
        item.critiques = texts[at : at + len(responses)]
        at += len(responses)
        try:
            item.rows = encoder.critique_rows(
                prompt, responses, item.critiques, critic.critique_prompt
            )[0]
        except RecordError as exc:
            item.kind, item.error, item.rows = "error", f"{exc.reason}: {exc.detail}", []
    return items


def format_records(
    raws: list[RawRecord], encoder: Encoder, handler_name: str | None, map_keys: Any
) -> list[Item]:
    """Records -> items in input order: pairs through preprocessing's record encoder,
    single responses through the same template and tokenizer."""
    items: dict[int, Item] = {}
    pairs: list[RawRecord] = []
    ids: dict[int, Any] = {}
    for i, raw in enumerate(raws):
        try:
            record = _record(raw.payload)
            ids[i] = record.get("id")
            is_pair = handler_name or "chosen" in record or "rejected" in record
            if is_pair:
                pairs.append(RawRecord(raw.source, i, record))
            elif "messages" in record:
                items[i] = Item(i, "single", [encoder.conversation(record["messages"])])
            else:
                prompt = prompt_messages(record.get("prompt"))
                system = record.get("system")
                if isinstance(system, str) and system.strip() and prompt[0]["role"] != "system":
                    prompt = [{"role": "system", "content": system}, *prompt]
                if "response" not in record:
                    raise RecordError("missing_key", "response (or chosen/rejected) is missing")
                items[i] = Item(i, "single", encoder.group(prompt, [record["response"]])[0])
        except RecordError as exc:
            items[i] = Item(i, "error", error=f"{exc.reason}: {exc.detail}")
    if pairs:
        handler = get_handler(handler_name or "pairwise_messages", map_keys)
        for raw, result in encoder.pairs(pairs, handler):
            if result[0] == "ok":
                prompt, chosen, rejected = result[1:4]
                rows = [prompt.tolist() + chosen.tolist(), prompt.tolist() + rejected.tolist()]
                items[raw.index] = Item(raw.index, "pair", rows)
            else:
                items[raw.index] = Item(raw.index, "error", error=f"{result[1]}: {result[2]}")
    for i, record_id in ids.items():
        items[i].record_id = record_id
    return [items[i] for i in range(len(raws))]


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m megarm.score", description=__doc__.split("\n")[0])
    cli.add_model_arguments(p)
    cli.add_critique_arguments(p)
    p.add_argument("--input", required=True, help="records: file, directory or glob")
    p.add_argument("--output", required=True, help="rewards jsonl (one line per input record)")
    p.add_argument("--handler-name", help="pair format (default: pairwise_messages / single)")
    p.add_argument("--map-keys", help='JSON renaming for the handler, e.g. {"prompt": "question"}')
    return p


def open_output(output: str, inputs: list[Path]) -> tuple[Path, IO[str]]:
    """The output path and an open temporary file beside it: refuses an output that
    is one of the inputs (symlinks and hard links resolved) and fails now, not after scoring, when
    the location cannot be written."""
    path = Path(output)
    if any(cli.is_same_file(path, source) for source in inputs):  # symlinks, hard links
        raise ScoreError(f"--output {output} is an input file; write the rewards elsewhere")
    if path.is_dir():
        raise ScoreError(f"--output {output} is a directory; name a file")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path, open(tmp, "w", encoding="utf-8")
    except OSError as exc:
        raise ScoreError(f"cannot write --output {output}: {exc.strerror or exc}") from exc


def write_output(
    handle: IO[str],
    items: list[Item],
    rewards: list[float],
    attributes: list[dict[str, float] | None] | None = None,
) -> dict[str, Any]:
    """Write one line per record, in input order; return counts and pair accuracy.
    A regression head's lines add every attribute (``attributes``, or
    ``chosen_attributes`` / ``rejected_attributes``) beside the combined reward."""
    attributes = attributes or [None] * len(rewards)
    row = 0
    pairs = correct = singles = errors = 0
    for item in items:
        line: dict[str, Any] = {"index": item.index}
        if item.record_id is not None:
            line["id"] = item.record_id
        if item.kind == "pair":
            chosen, rejected = rewards[row], rewards[row + 1]
            line.update(chosen_reward=chosen, rejected_reward=rejected)
            if attributes[row] is not None:
                line.update(chosen_attributes=attributes[row],
                            rejected_attributes=attributes[row + 1])
            if item.critiques is not None:
                line.update(chosen_critique=item.critiques[0], rejected_critique=item.critiques[1])
            pairs += 1
            correct += int(chosen > rejected)
        elif item.kind == "single":
            line["reward"] = rewards[row]
            if attributes[row] is not None:
                line["attributes"] = attributes[row]
            if item.critiques is not None:
                line["critique"] = item.critiques[0]
            singles += 1
        else:
            line["error"] = item.error
            errors += 1
        row += len(item.rows)
        handle.write(json.dumps(line) + "\n")
    return {
        "pairs": pairs,
        "accuracy": correct / pairs if pairs else None,
        "singles": singles,
        "errors": errors,
    }


def score(args: argparse.Namespace) -> dict[str, Any] | None:
    """Score ``args.input`` in this launch's process group; rank 0 writes the output
    and returns the summary (other ranks return ``None``)."""
    driver = int(os.environ.get("RANK", "0")) == 0
    output = handle = None
    inputs: list[Path] = []
    try:
        map_keys = json.loads(args.map_keys) if args.map_keys else None
        if args.handler_name:
            get_handler(args.handler_name, map_keys)  # an unknown name fails before loading
        if driver:
            inputs = resolve_inputs(args.input)
            output, handle = open_output(args.output, inputs)
    except (InputError, ValueError) as exc:  # ValueError: bad handler name, keys or JSON
        raise ScoreError(str(exc)) from exc
    try:
        scorer, encoder, info = open_scorer(cli.scorer_spec(args))
        with scorer:
            if not scorer.is_driver:
                scorer.follow()
                return None
            raws = list(iter_records(inputs))
            critic = cli.open_critic(args, info, encoder)
            if critic is None:
                items = format_records(raws, encoder, args.handler_name, map_keys)
            else:
                items = critique_records(raws, encoder, args.handler_name, map_keys, critic)
            if not items:
                raise ScoreError(f"--input {args.input} holds no records")
            values = scorer.outputs([row for item in items for row in item.rows])
            rewards = [scorer.attributes.reward(v) for v in values]
            attributes = [scorer.attributes.named(v) for v in values]
        assert handle is not None and output is not None
        summary = write_output(handle, items, rewards, attributes)
        handle.close()
        os.replace(handle.name, output)
    finally:
        if handle is not None and not handle.closed:
            handle.close()
            os.remove(handle.name)
    accuracy = summary["accuracy"]
    print(
        f"scored {len(items)} records: {summary['pairs']} pairs"
        + (f" (accuracy {accuracy:.4f})" if accuracy is not None else "")
        + f", {summary['singles']} single responses, {summary['errors']} rejected; "
        f"wrote {args.output}",
        flush=True,
    )
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a bad input)."""
    return cli.run_command(build_parser(), score, argv)


if __name__ == "__main__":
    sys.exit(main())
