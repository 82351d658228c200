"""The record encoder: raw records -> token ids, as preprocessing writes them.

The handler decides what a record becomes (a pair, a critique pair, an SFT
record); the chat template renders its parts and the fast tokenizer encodes them
(batched); :func:`fit_prompt` cuts a long prompt by the truncation policy.
Preprocessing runs it in N worker processes; scoring and evaluation run it in
process (:func:`encode_records`), so a scored row is the row training saw.
"""

from __future__ import annotations

import collections
import json
import multiprocessing
import os
import signal
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from megarm.data.handlers import Handler, Pair, RecordError, SFTRecord
from megarm.data.ranked import RankedRecord
from megarm.data.readers import RawRecord
from megarm.data.regression import RegressionRecord
from megarm.data.steps import StepRecord
from megarm.data.templates import DEFAULT_CRITIQUE_PROMPT, Template, critique_turn

TRUNCATION_POLICIES = ("left", "right", "drop")


@dataclass
class _Job:
    """What a worker needs; set once per process (inherited on fork)."""

    handler: Handler
    template: Template
    tokenizer: Any
    seq_length: int | None
    truncation: str
    header_len: int
    critique_prompt: str = DEFAULT_CRITIQUE_PROMPT
    step_marker_id: int | None = None
    """Step-labelled records: the step-end marker's token id, appended after each step."""
    max_record_bytes: int | None = None
    """A record longer than this (its JSON line, or its texts for other formats) is
    rejected ``too_large`` before it is tokenised: one 100 MB line took 2 min and
    10 GiB to tokenise, only to be cut to ``seq_length``."""

    def check_size(self, size: int, what: str) -> None:
        """Refuse ``size`` bytes (``RecordError`` ``too_large``) above the limit."""
        if self.max_record_bytes and size > self.max_record_bytes:
            raise RecordError(
                "too_large",
                f"{what} {size:,} bytes > --max-record-bytes {self.max_record_bytes:,}",
            )

    def texts(
        self, item: Pair | SFTRecord | RankedRecord | RegressionRecord | StepRecord
    ) -> list[str]:
        """The texts a record is tokenized as: prompt, then each sequence's tail (a
        critique pair's tail is two texts: response + critique turn, then critique;
        a ranked record has K tails, one per response)."""
        t = self.template
        if isinstance(item, StepRecord):  # each step on its own, then the turn's end
            return [t.prompt(item.prompt), *item.steps, t.response("")]
        if isinstance(item, RankedRecord):
            return [t.prompt(item.prompt), *(t.response(r) for r in item.responses)]
        if isinstance(item, RegressionRecord):
            return [t.prompt(item.prompt), t.response(item.response)]
        if isinstance(item, SFTRecord):
            return [t.prompt(item.prompt), t.response(item.target)]
        if item.chosen_critique is None:
            return [t.prompt(item.prompt), t.response(item.chosen), t.response(item.rejected)]
        prompt, chosen = critique_turn(t, item.prompt, item.chosen, self.critique_prompt)
        _, rejected = critique_turn(t, item.prompt, item.rejected, self.critique_prompt)
        return [prompt, chosen, t.response(item.chosen_critique), rejected,
                t.response(item.rejected_critique)]  # type: ignore[arg-type]


_JOB: _Job | None = None


def _init_worker(job: _Job) -> None:
    global _JOB
    _JOB = job
    # Workers already give the parallelism; Rust threads per worker would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    # A forked worker inherits main()'s SIGTERM handler; Pool.terminate() must kill it
    # outright, not raise SystemExit at an arbitrary point (that can hang on a lock).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # skip transformers' per-call overhead
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def fit_prompt(
    prompt: list[int],
    longest: int,
    seq_length: int | None,
    header_len: int,
    truncation: str = "left",
) -> tuple[list[int], bool]:
    """The prompt cut so ``prompt + longest response`` fits ``seq_length``, and
    whether it was cut (preprocessing and ``megarm.score`` share this rule).

    ``left`` drops the prompt's first tokens, ``right`` its last tokens before the
    assistant header (``header_len`` tokens, never cut), ``drop`` refuses. Chosen and
    rejected share the one cut prompt, so they are compared on the same context.
    Raises ``RecordError("too_long")`` when even the assistant header does not fit.
    """
    if seq_length is None or len(prompt) + longest <= seq_length:
        return prompt, False
    detail = f"prompt {len(prompt)} + response {longest} tokens > --seq-length {seq_length}"
    keep = seq_length - longest
    if truncation == "drop" or keep < header_len:
        raise RecordError("too_long", detail)
    if truncation == "left":
        return prompt[len(prompt) - keep :], True
    head = keep - header_len  # "right": keep the start, and always the header
    return prompt[:head] + prompt[len(prompt) - header_len :], True


def fit_steps(
    prompt: list[int],
    steps: list[list[int]],
    end: list[int],
    seq_length: int | None,
    header_len: int,
    truncation: str = "left",
) -> tuple[list[int], list[int], list[int], int, bool]:
    """A step-labelled record fitted into ``seq_length``: ``(prompt, tail, marker
    offsets in the tail, steps cut, prompt cut)``. Each step in ``steps`` already ends
    with its marker token.

    ``drop`` refuses a record that does not fit. Otherwise the solution's trailing
    steps are cut first (a step's label judges the steps up to it, so the leading
    steps keep valid labels; the turn's end goes with them), down to one step; if
    that one still does not fit, the prompt is cut by the policy of
    :func:`fit_prompt`. Raises ``RecordError("too_long")`` when nothing fits."""
    total = len(prompt) + sum(map(len, steps)) + len(end)
    kept, tail_end = len(steps), end
    if seq_length is not None and total > seq_length:
        if truncation == "drop":
            raise RecordError(
                "too_long", f"prompt {len(prompt)} + solution {total - len(prompt)} tokens > "
                f"--seq-length {seq_length}"
            )
        tail_end, room = [], seq_length - len(prompt)
        while kept > 1 and sum(map(len, steps[:kept])) > room:
            kept -= 1
    tail: list[int] = []
    offsets: list[int] = []
    for step in steps[:kept]:
        tail += step
        offsets.append(len(tail) - 1)
    tail += tail_end
    prompt, cut = fit_prompt(prompt, len(tail), seq_length, header_len, truncation)
    return prompt, tail, offsets, len(steps) - kept, cut or kept < len(steps)


def _process_chunk(chunk: list[RawRecord]) -> list[tuple]:
    """Records -> ``("ok", prompt, chosen, rejected, margin, truncated, supervised)``
    or ``("reject", reason, detail)``, one per record, in order.

    ``chosen`` / ``rejected`` are everything after the prompt; ``supervised`` gives,
    per sequence, where its labels start within it (0: all of it; a critique pair's
    critique starts after the response and critique turn). An SFT record has its
    target as ``chosen`` and ``rejected`` and ``margin`` ``None``."""
    job = _JOB
    assert job is not None, "worker not initialised"
    results: list[tuple | None] = [None] * len(chunk)
    todo: list[tuple[int, Any, int]] = []
    texts: list[str] = []
    for i, raw in enumerate(chunk):
        try:
            record = raw.payload
            if isinstance(record, bytes):
                job.check_size(len(record), "the line is")
                try:
                    record = json.loads(record)
                except ValueError as exc:  # includes bad UTF-8
                    raise RecordError("malformed_json", str(exc)) from None
            if not isinstance(record, dict):
                raise RecordError("malformed_record", "the record is not a JSON object")
            item = job.handler(record)
            parts = job.texts(item)
            if not isinstance(raw.payload, bytes):  # a row (parquet, csv...): its texts
                job.check_size(sum(len(part.encode()) for part in parts), "the record's text is")
            todo.append((i, item, len(texts)))
            texts += parts
        except RecordError as exc:
            results[i] = ("reject", exc.reason, exc.detail)
    if todo:
        ids = _encode(job.tokenizer, texts)
        for i, item, at in todo:
            prompt, tails, supervised = ids[at], [], []
            if isinstance(item, StepRecord):
                k, marker = len(item.steps), job.step_marker_id
                assert marker is not None, "step-labelled records need the marker's token id"
                steps = [step + [marker] for step in ids[at + 1 : at + 1 + k]]
                try:
                    prompt, tail, offsets, cut_steps, truncated = fit_steps(
                        prompt, steps, ids[at + 1 + k], job.seq_length, job.header_len,
                        job.truncation,
                    )
                except RecordError as exc:
                    results[i] = ("reject", exc.reason, exc.detail)
                    continue
                positions = np.asarray(offsets, dtype=np.int32) + len(prompt)
                targets = np.asarray(item.labels[: len(offsets)], dtype=np.float32)
                results[i] = ("ok", np.asarray(prompt, dtype=np.int32),
                              np.asarray(tail, dtype=np.int32), None,
                              (positions, targets, cut_steps), truncated, (0,))
                continue
            if isinstance(item, RankedRecord):
                k = len(item.responses)
                tails, supervised = ids[at + 1 : at + 1 + k], [0] * k
            elif isinstance(item, (SFTRecord, RegressionRecord)):
                tails, supervised = [ids[at + 1]], [0]
            elif item.chosen_critique is None:
                tails, supervised = [ids[at + 1], ids[at + 2]], [0, 0]
            else:  # response + critique turn, then the critique (supervised)
                tails = [ids[at + 1] + ids[at + 2], ids[at + 3] + ids[at + 4]]
                supervised = [len(ids[at + 1]), len(ids[at + 3])]
            try:
                prompt, truncated = fit_prompt(
                    prompt, max(map(len, tails)), job.seq_length, job.header_len, job.truncation
                )
            except RecordError as exc:
                results[i] = ("reject", exc.reason, exc.detail)
                continue
            arrays = [np.asarray(tail, dtype=np.int32) for tail in tails]
            if isinstance(item, RankedRecord):
                scores = np.asarray(item.scores, dtype=np.float32)
                results[i] = ("ok", np.asarray(prompt, dtype=np.int32), arrays, None, scores,
                              truncated, tuple(supervised))
                continue
            if isinstance(item, RegressionRecord):  # missing labels: NaN
                labels = np.asarray([np.nan if v is None else v for v in item.labels], np.float32)
                results[i] = ("ok", np.asarray(prompt, dtype=np.int32), arrays[0], None, labels,
                              truncated, tuple(supervised))
                continue
            results[i] = (
                "ok",
                np.asarray(prompt, dtype=np.int32),
                arrays[0],
                arrays[1] if len(arrays) > 1 else None,
                getattr(item, "margin", None),
                truncated,
                tuple(supervised),
            )
    return results  # type: ignore[return-value]


def _chunks(records: Iterator[RawRecord], size: int) -> Iterator[list[RawRecord]]:
    chunk: list[RawRecord] = []
    for record in records:
        chunk.append(record)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _results(job: _Job, chunks: Iterator[list[RawRecord]], workers: int) -> Iterator[tuple]:
    """``(raw record, result)`` in input order, from ``workers`` processes."""
    global _JOB
    if workers == 1:
        # In-process; the Rust tokenizer may use its own threads here.
        previous, _JOB = _JOB, job
        try:
            for chunk in chunks:
                yield from zip(chunk, _process_chunk(chunk), strict=True)
        finally:
            _JOB = previous
        return
    # fork shares the loaded tokenizer with the workers; spawn (no fork) pickles it.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    # A bounded window of tasks in flight keeps memory flat however large the
    # input (Pool.imap would queue every result the writer has not consumed yet).
    window = 2 * workers
    with ctx.Pool(workers, initializer=_init_worker, initargs=(job,)) as pool:
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            pending.append((chunk, pool.apply_async(_process_chunk, (chunk,))))
            if len(pending) >= window:
                done, result = pending.popleft()
                yield from zip(done, result.get(), strict=True)
        while pending:
            done, result = pending.popleft()
            yield from zip(done, result.get(), strict=True)
        # Let the workers exit on their own; the with-block's terminate() is for errors.
        pool.close()
        pool.join()


def encode_records(
    records: Iterable[RawRecord],
    handler: Handler,
    template: Template,
    tokenizer: Any,
    seq_length: int | None = None,
    truncation: str = "left",
    critique_prompt: str = DEFAULT_CRITIQUE_PROMPT,
) -> Iterator[tuple[RawRecord, tuple]]:
    """Preprocessing's record encoder in this process (``megarm.score`` and
    ``megarm.evaluate`` use it): ``(raw record, result)`` in input order, each result
    ``("ok", prompt, chosen, rejected, margin, truncated, supervised)`` or
    ``("reject", reason, detail)``, exactly as a preprocessing run computes it
    (``prompt + chosen`` and ``prompt + rejected`` are the two token rows)."""
    if handler.kind == "prm":
        raise ValueError(f"handler {handler.name}: per-step scoring of step-labelled records is "
                         "not built yet (issue #29)")
    header_len = len(tokenizer.encode(template.header, add_special_tokens=False))
    job = _Job(handler, template, tokenizer, seq_length, truncation, header_len, critique_prompt)
    return _results(job, _chunks(iter(records), 128), 1)
