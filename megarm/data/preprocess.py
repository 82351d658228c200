"""Raw preference pairs -> megatron-core indexed datasets (``tools/preprocess_data.py``).

The handler decides what a record becomes: a preference pair (four files: chosen and
rejected input ids and labels, labels -100 over the prompt), a critique pair (the
same four files; each side is prompt + response + critique turn, only the critique
supervised, ``kind: critique_pairs`` in stats.json) or an SFT record (``input_ids``
and ``labels``, only the target supervised, ``kind: sft``).

The pipeline: read records in order (:mod:`megarm.data.readers`), hand chunks to N
worker processes that run the handler, the chat template and the fast tokenizer
(batched), and write the results in input order through megatron-core's
``IndexedDatasetBuilder``. Output is byte-identical for any ``--workers``.

Everything is written under ``<prefix>.tmp-<pid>_...`` names and renamed only once
the run is complete and accepted, so a killed or failed run leaves no final files.
An existing output prefix is replaced only with ``--overwrite``; a finished run owns
exactly the files its ``<prefix>_stats.json`` lists (stale siblings are removed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
import time
import warnings
from array import array
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from megarm import cli
from megarm.data.dataset import (
    rejects_path,
    stats_path,
)
from megarm.data.encoding import TRUNCATION_POLICIES, _chunks, _Job, _results
from megarm.data.handlers import (
    HANDLER_ALIASES,
    HANDLERS,
    REJECT_REASONS,
    get_handler,
)
from megarm.data.outputs import (
    PreprocessError,
    _Outputs,
    _raise_write_error,
    existing_outputs,
)
from megarm.data.readers import InputError, RawRecord, iter_records, record_unit, resolve_inputs
from megarm.data.templates import (
    DEFAULT_CRITIQUE_PROMPT,
    PROMPT_TYPES,
    TemplateError,
    get_template,
    reward_convention,
)
from megarm.data.tokenizer import HF_TOKENIZER_TYPES, TokenizerError, load_tokenizer, vocab_sha256

# --------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    """The command line; every option can also come from ``--config`` YAML (underscores)."""
    p = argparse.ArgumentParser(
        prog="preprocess_data.py",
        description="Tokenize preference pairs into megatron-core indexed datasets "
        "(<prefix>_packed_{chosen,rejected}_{input_ids,labels}_document.{bin,idx}).",
    )
    p.add_argument("--config", help="YAML file with any of these options (underscored keys)")
    p.add_argument(
        "--input", help="file, directory or glob of .jsonl/.json/.parquet/.csv/.arrow (.gz)"
    )
    p.add_argument("--output-prefix", help="output path prefix, e.g. data/hh_rlhf")
    p.add_argument("--tokenizer-name-or-path", help="Hugging Face tokenizer directory")
    p.add_argument(
        "--tokenizer-type",
        default="HuggingFaceTokenizer",
        help=f"one of {', '.join(HF_TOKENIZER_TYPES)} (both load a Hugging Face tokenizer)",
    )
    p.add_argument(
        "--handler-name",
        help=f"record format: {', '.join(HANDLERS)} (or MindSpeed-RL's {', '.join(HANDLER_ALIASES)})",
    )
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    p.add_argument(
        "--seq-length",
        type=int,
        default=None,
        help="max tokens per sequence (default: the smaller of max_position_embeddings in a "
        "config.json beside the tokenizer and the tokenizer's model_max_length)",
    )
    p.add_argument(
        "--truncation",
        default="left",
        help="left: cut the prompt's first tokens; right: cut the prompt's last tokens before "
        "the assistant header; drop: drop pairs that do not fit. Responses are never cut.",
    )
    p.add_argument("--prompt-type", default="auto", help=f"chat format: {', '.join(PROMPT_TYPES)}")
    p.add_argument("--map-keys", help='JSON renaming, e.g. \'{"prompt": "question"}\'')
    p.add_argument(
        "--critique-prompt",
        default=DEFAULT_CRITIQUE_PROMPT,
        help="critique_pairs: the user turn that asks for the critique after the response "
        "({prompt} and {response} are filled in where named); recorded in stats.json and "
        f"used again at scoring. Default: {DEFAULT_CRITIQUE_PROMPT!r}",
    )
    p.add_argument(
        "--margin",
        nargs="+",
        help="margin column, or two score columns CHOSEN REJECTED (margin = their difference)",
    )
    p.add_argument(
        "--label-names",
        type=lambda text: [name.strip() for name in text.split(",")],
        help="regression / helpsteer2: the attributes, comma-separated, in the order of the "
        "model's outputs (helpsteer2: helpfulness,correctness,coherence,complexity,verbosity)",
    )
    p.add_argument(
        "--label-range",
        nargs=2,
        type=float,
        metavar=("LOW", "HIGH"),
        help="regression: reject records with a label outside [LOW, HIGH] (helpsteer2: 0 4)",
    )
    p.add_argument(
        "--step-marker",
        default=None,
        help="prm_steps / math_shepherd: the step-end marker, a text the tokenizer encodes as "
        "one token, appended after every step (its reward is read there); recorded in "
        "stats.json and the checkpoint. Default: two newlines",
    )
    p.add_argument(
        "--step-labels",
        default=None,
        help="prm_steps / math_shepherd: hard (+/-, 1/-1/0, true/false; default) or soft "
        "(a number in [0, 1] per step)",
    )
    p.add_argument(
        "--neutral-label",
        default=None,
        help="hard step labels: what PRM800K's neutral 0 becomes: positive (default), "
        "negative, or reject (the record)",
    )
    p.add_argument(
        "--step-tag",
        default=None,
        help="math_shepherd: the tag that ends each step in input and label (default ки)",
    )
    p.add_argument(
        "--max-reject-fraction",
        type=float,
        default=0.5,
        help="fail (and write nothing) if more than this fraction of records is rejected",
    )
    p.add_argument(
        "--max-record-bytes",
        type=int,
        default=None,
        help="reject a record longer than this (its JSON line, or its texts) as too_large "
        "before tokenising it (default: the larger of 4 MiB and 256 bytes per --seq-length "
        f"token, {NO_LIMIT_RECORD_BYTES >> 20} MiB without a length limit; 0: no limit)",
    )
    p.add_argument("--log-interval", type=int, default=1000, help="progress line every K records")
    p.add_argument("--chunk-size", type=int, default=128, help="records per worker task")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the files of an existing --output-prefix (refused without it)",
    )
    return p


# No tokenizer averages anywhere near 256 bytes a token, so a record above the
# default limit is cut by more than 99% to fit seq_length; tokenising it first cost
# about 1.4 s and 100 MB of memory per MB (issue #25: a 100 MB line, 2 min 24 s, 10.3 GiB).
MIN_RECORD_BYTES = 4 << 20
RECORD_BYTES_PER_TOKEN = 256
NO_LIMIT_RECORD_BYTES = 64 << 20


def default_max_record_bytes(seq_length: int | None) -> int:
    """The ``--max-record-bytes`` a run without one uses."""
    if seq_length is None:
        return NO_LIMIT_RECORD_BYTES
    return max(MIN_RECORD_BYTES, RECORD_BYTES_PER_TOKEN * seq_length)


def _load_yaml(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            config = yaml.safe_load(handle) or {}
    except OSError as exc:
        raise PreprocessError(f"cannot read --config {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise PreprocessError(f"--config {path} must be a mapping of option: value")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    unknown = sorted(set(config) - set(actions))
    if unknown:
        raise PreprocessError(
            f"--config {path} has unknown keys {unknown}; valid keys: {sorted(actions)}"
        )
    for key, value in config.items():
        action = actions[key]
        # YAML scalars arrive typed; strings still go through the option's type.
        if isinstance(value, str) and action.type is not None:
            config[key] = action.type(value)
        if key == "margin" and isinstance(value, str):
            config[key] = [value]
    return config


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line over ``--config`` YAML over defaults; validated."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**_load_yaml(pre.config, parser))
    args = parser.parse_args(argv)
    missing = [
        f"--{name.replace('_', '-')}"
        for name in ("input", "output_prefix", "tokenizer_name_or_path", "handler_name")
        if not getattr(args, name)
    ]
    if missing:
        raise PreprocessError(f"missing required option(s): {', '.join(missing)}")
    if args.prompt_type not in PROMPT_TYPES:
        raise PreprocessError(f"--prompt-type {args.prompt_type!r}: choose from {PROMPT_TYPES}")
    if args.truncation not in TRUNCATION_POLICIES:
        raise PreprocessError(
            f"--truncation {args.truncation!r}: choose from {TRUNCATION_POLICIES}"
        )
    if isinstance(args.map_keys, str):
        try:
            args.map_keys = json.loads(args.map_keys)
        except ValueError as exc:
            raise PreprocessError(f"--map-keys is not valid JSON: {exc}") from exc
    if args.map_keys is not None and not isinstance(args.map_keys, dict):
        raise PreprocessError('--map-keys must be a JSON object like {"prompt": "question"}')
    for name, low in (("workers", 1), ("log_interval", 1), ("chunk_size", 1), ("seq_length", 2),
                      ("max_record_bytes", 0)):
        value = getattr(args, name)
        if value is not None and value < low:
            raise PreprocessError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    if not 0 <= args.max_reject_fraction <= 1:
        raise PreprocessError(
            f"--max-reject-fraction must be in [0, 1], got {args.max_reject_fraction}"
        )
    return args


class _Progress:
    """A log line every ``interval`` records on stderr; a tqdm bar when it is a terminal."""

    def __init__(self, interval: int) -> None:
        self.interval = interval
        self.start = time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(unit="rec", file=sys.stderr, dynamic_ncols=True)

    def elapsed(self) -> float:
        """Seconds since processing started (setup and imports excluded)."""
        return max(time.perf_counter() - self.start, 1e-9)

    def line(self, records: int, tokens: int, rejected: int) -> str:
        elapsed = self.elapsed()
        return (
            f"{records} records ({records / elapsed:.1f} records/s, {tokens / elapsed:.0f} "
            f"tokens/s), rejected {rejected}"
        )

    def update(self, records: int, tokens: int, rejected: int) -> None:
        if self.bar is not None:
            self.bar.update(1)
        if records % self.interval == 0:
            self.write(self.line(records, tokens, rejected))

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _percentiles(lengths: array) -> dict[str, float]:
    values = np.frombuffer(lengths, dtype=np.int32) if len(lengths) else np.zeros(1, np.int32)
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "max": int(values.max())}


def megarm_version() -> str:
    """The installed megarm version, or ``0+unknown`` from a source checkout."""
    try:
        return metadata.version("megarm")
    except metadata.PackageNotFoundError:
        return "0+unknown"


# --------------------------------------------------------------------------- pipeline


# transformers' model_max_length when a tokenizer sets none (int(1e30)); anything this
# large is not a limit.
_UNSET_MAX_LENGTH = 1_000_000


def default_seq_length(tokenizer_dir: str, tokenizer: Any) -> tuple[int | None, str]:
    """``--seq-length`` when none is given, and where it came from: the smaller of the
    model's ``max_position_embeddings`` (a config.json beside the tokenizer, as in an HF
    model directory) and the tokenizer's ``model_max_length`` (ignored when it is
    transformers' "unset" value, >= 1e6). ``(None, why)`` when neither is known."""
    limits: list[tuple[int, str]] = []
    config = Path(tokenizer_dir) / "config.json"
    if config.is_file():
        with contextlib.suppress(ValueError, OSError, TypeError):
            value = json.loads(config.read_text()).get("max_position_embeddings")
            if isinstance(value, int) and value > 0:
                limits.append((value, f"max_position_embeddings in {config}"))
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < _UNSET_MAX_LENGTH:
        limits.append((value, f"the tokenizer's model_max_length ({tokenizer_dir})"))
    if not limits:
        return None, "neither the tokenizer nor a config.json beside it states a maximum length"
    return min(limits)


def step_marker_id(tokenizer: Any, marker: str) -> int:
    """The one token id ``marker`` encodes to; ``ValueError`` naming --step-marker when
    it is several tokens (its reward position would be ambiguous)."""
    ids = tokenizer.encode(marker, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(
            f"--step-marker {marker!r} encodes to {len(ids)} tokens {ids} with this tokenizer; "
            "choose a text it keeps as one token (e.g. two newlines, or a special token)"
        )
    return int(ids[0])


def _prepare(args: argparse.Namespace) -> tuple[_Job, list]:
    """Everything a run needs before its first record: the inputs, tokenizer, template
    and handler, the sequence length, and a writable output directory."""
    earlier = existing_outputs(args.output_prefix)
    if earlier and not args.overwrite:
        raise PreprocessError(
            f"--output-prefix {args.output_prefix} already holds {len(earlier)} file(s) of "
            f"an earlier run, e.g. {earlier[0]}; pass --overwrite to replace them (files the "
            "new run does not write are removed) or choose another --output-prefix"
        )
    try:
        files = resolve_inputs(args.input)
        tokenizer = load_tokenizer(args.tokenizer_name_or_path, args.tokenizer_type)
        template = get_template(args.prompt_type, tokenizer)
        handler = get_handler(args.handler_name, args.map_keys, args.margin)
        if handler.kind == "regression":
            handler.set_labels(args.label_names, args.label_range)  # type: ignore[attr-defined]
        elif args.label_names or args.label_range:
            raise ValueError(f"--label-names and --label-range are for regression handlers, "
                             f"not {args.handler_name}")
        step_options = (args.step_marker, args.step_labels, args.neutral_label, args.step_tag)
        if handler.kind == "prm":
            handler.set_steps(*step_options)  # type: ignore[attr-defined]
        elif any(option is not None for option in step_options):
            raise ValueError("--step-marker, --step-labels, --neutral-label and --step-tag are "
                             f"for the step-labelled handlers, not {args.handler_name}")
        marker_id = step_marker_id(tokenizer, handler.step_marker) \
            if handler.kind == "prm" else None  # type: ignore[attr-defined]
    except (InputError, TokenizerError, TemplateError, ValueError) as exc:
        raise PreprocessError(str(exc)) from exc
    # --overwrite removes and replaces these: one of them as an input (itself, or
    # through a symlink or hard link) would be destroyed by its own run.
    owned = [*existing_outputs(args.output_prefix), stats_path(args.output_prefix),
             rejects_path(args.output_prefix)]
    for source in files:
        clash = next((o for o in owned if cli.is_same_file(Path(source), Path(o))), None)
        if clash is not None:
            raise PreprocessError(
                f"--input {source} is {clash}, a file this --output-prefix writes; the run "
                "would replace its own input: choose another --output-prefix"
            )
    if args.seq_length is None:
        args.seq_length, source = default_seq_length(args.tokenizer_name_or_path, tokenizer)
        if args.seq_length is None:
            print(f"--seq-length not given and {source}: no length limit", file=sys.stderr)
        else:
            print(f"--seq-length not given: using {args.seq_length} ({source})", file=sys.stderr)
    job = _Job(
        handler=handler,
        template=template,
        tokenizer=tokenizer,
        seq_length=args.seq_length,
        truncation=args.truncation,
        header_len=len(tokenizer.encode(template.header, add_special_tokens=False)),
        critique_prompt=args.critique_prompt,
        step_marker_id=marker_id,
    )
    if args.max_record_bytes is None:
        args.max_record_bytes = default_max_record_bytes(args.seq_length)
    job.max_record_bytes = args.max_record_bytes or None
    if args.seq_length is not None and args.seq_length <= job.header_len:
        raise PreprocessError(
            f"--seq-length {args.seq_length} leaves no room after the {job.header_len}-token "
            "assistant header"
        )
    try:
        Path(args.output_prefix).parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _raise_write_error(exc, args.output_prefix)
    leftovers = sorted(
        Path(args.output_prefix).parent.glob(Path(args.output_prefix).name + ".tmp-*")
    )
    if leftovers:
        warnings.warn(
            f"{len(leftovers)} temporary file(s) of an interrupted run lie next to the output, "
            f"e.g. {leftovers[0]}; delete them",
            stacklevel=3,
        )
    return job, files


class _Tally:
    """What a run counts as records go by: kept, rejected (with the first reasons
    quoted), truncated, lengths and tokens per side, the largest token id."""

    def __init__(self, sides: tuple[str, ...], files: list, units: list[str]) -> None:
        self.sides, self.files, self.units = sides, files, units
        self.counts = {"records": 0, "kept": 0, "rejected": 0, "truncated": 0}
        self.reasons = dict.fromkeys(REJECT_REASONS, 0)
        self.lengths = {side: array("i") for side in sides}
        self.tokens = dict.fromkeys(sides, 0)
        self.supervised_tokens = 0
        self.examples: list[str] = []  # the first rejects, quoted if the run fails
        self.max_token_id = -1  # checked against the model's vocabulary before training
        self.responses = array("i")  # ranked records: responses per record
        # step-labelled records: steps kept, cut by the truncation rule, labelled bad
        self.steps = {"steps": 0, "cut_steps": 0, "negative_steps": 0}

    def kept(self, result: tuple) -> None:
        _, prompt, chosen, rejected, extra, truncated, supervised = result
        if isinstance(extra, tuple):  # a step-labelled record: (positions, targets, cut)
            self.steps["steps"] += len(extra[0])
            self.steps["cut_steps"] += int(extra[2])
            self.steps["negative_steps"] += int(np.count_nonzero(extra[1] < 0.5))
        if isinstance(chosen, list):  # a ranked record: K responses, one length each
            self.responses.append(len(chosen))
            self._count(prompt, chosen, truncated)
            for tail in chosen:
                self.lengths["responses"].append(len(prompt) + len(tail))
                self.tokens["responses"] += len(prompt) + len(tail)
                self.supervised_tokens += len(tail)
            return
        tails = [chosen] if rejected is None else [chosen, rejected]
        self._count(prompt, tails, truncated)
        for side, tail, start in zip(self.sides, tails, supervised, strict=True):
            self.lengths[side].append(len(prompt) + len(tail))
            self.tokens[side] += len(prompt) + len(tail)
            self.supervised_tokens += len(tail) - start

    def _count(self, prompt: np.ndarray, tails: list[np.ndarray], truncated: bool) -> None:
        for ids in (prompt, *tails):
            if len(ids):
                self.max_token_id = max(self.max_token_id, int(ids.max()))
        self.counts["records"] += 1
        self.counts["kept"] += 1
        self.counts["truncated"] += int(truncated)

    def rejected(self, raw: RawRecord, reason: str, detail: str) -> dict[str, Any]:
        """Count a rejected record; its line for the rejects file."""
        self.counts["records"] += 1
        self.counts["rejected"] += 1
        self.reasons[reason] += 1
        source, unit = self.files[raw.source], self.units[raw.source]
        if len(self.examples) < 3:
            self.examples.append(f"{source}:{unit} {raw.index}: {reason} ({detail})")
        payload = raw.payload
        return {
            "source": str(source),
            unit: raw.index,
            "reason": reason,
            "detail": detail,
            **(
                {"raw": payload.decode("utf-8", errors="replace").rstrip("\n")}
                if isinstance(payload, bytes)
                else {"record": payload}
            ),
        }

    def check(self, args: argparse.Namespace) -> None:
        """Refuse a run with no records, none kept, or too many rejected."""
        counts = self.counts
        if counts["records"] == 0:
            raise PreprocessError(f"input {args.input!r} holds no records")
        fraction = counts["rejected"] / counts["records"]
        if counts["kept"] == 0 or fraction > args.max_reject_fraction:
            top = ", ".join(f"{r}={n}" for r, n in self.reasons.items() if n)
            raise PreprocessError(
                f"{counts['rejected']} of {counts['records']} records rejected ({fraction:.1%} > "
                f"--max-reject-fraction {args.max_reject_fraction}): {top}; first: "
                + "; ".join(self.examples)
                + ". Check --handler-name and --map-keys against the data, or raise "
                "--max-reject-fraction"
            )


def _stats(
    args: argparse.Namespace, job: _Job, files: list, tally: _Tally, names: list[str], elapsed: float
) -> dict[str, Any]:
    """``<prefix>_stats.json``'s content."""
    handler, template, tokenizer = job.handler, job.template, job.tokenizer
    critiques = handler.name == "critique_pairs"
    records, tokens = tally.counts["records"], sum(tally.tokens.values())
    return {
        "megarm_version": megarm_version(),
        "handler": handler.name,
        # What the files hold: pairs, critique pairs (critiques supervised) or SFT.
        "kind": handler.kind if handler.kind in ("sft", "ranked", "regression", "prm")
        else "critique_pairs" if critiques else "pairs",
        "tokenizer": {
            "name_or_path": args.tokenizer_name_or_path,
            "vocab_sha256": vocab_sha256(tokenizer),
            "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
        },
        "template": {
            "prompt_type": args.prompt_type,
            "name": template.name,
            "end_of_turn": template.end_of_turn,
            "end_of_turn_id": tokenizer.convert_tokens_to_ids(template.end_of_turn),
            # Where the reward is read; training records it in its checkpoints.
            "reward_convention": reward_convention(
                template, tokenizer, args.critique_prompt if critiques else None,
                handler.step_marker if handler.kind == "prm" else None,  # type: ignore[attr-defined]
            ),
        },
        "inputs": [str(path) for path in files],
        "counts": tally.counts,
        "rejects": tally.reasons,
        "lengths": {side: _percentiles(values) for side, values in tally.lengths.items()},
        "tokens": tally.tokens,
        "supervised_tokens": tally.supervised_tokens,
        "has_margin": handler.has_margin,
        **({"label_names": list(handler.label_names),  # type: ignore[attr-defined]
            "label_range": handler.label_range} if handler.kind == "regression" else {}),  # type: ignore[attr-defined]
        **({"step_marker": {"text": handler.step_marker,  # type: ignore[attr-defined]
                            "id": job.step_marker_id},
            "step_labels": handler.label_type,  # type: ignore[attr-defined]
            "neutral_label": handler.neutral,  # type: ignore[attr-defined]
            "steps": tally.steps} if handler.kind == "prm" else {}),
        **({"responses_per_record": {
            "min": int(min(tally.responses)), "max": int(max(tally.responses)),
            "mean": round(float(np.mean(tally.responses)), 4),
        }} if len(tally.responses) else {}),
        "max_token_id": tally.max_token_id,
        "seq_length": args.seq_length,
        "files": names,
        "elapsed_s": round(elapsed, 3),
        "records_per_s": round(records / elapsed, 1),
        "tokens_per_s": round(tokens / elapsed, 1),
        "arguments": {k: v for k, v in vars(args).items()},
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Preprocess per ``args`` (from :func:`parse_args`); return the stats written.

    Every record is either written or listed in the rejects file with its reason;
    the outputs are renamed into place only when the run is accepted."""
    job, files = _prepare(args)
    kind = job.handler.kind
    sft, ranked, regression = kind == "sft", kind == "ranked", kind == "regression"
    sides = ("sequences",) if sft or regression or kind == "prm" else ("responses",) if ranked else ("chosen", "rejected")
    tally = _Tally(sides, files, [record_unit(path) for path in files])
    try:
        outputs = _Outputs(args.output_prefix, job.handler.has_margin, sft, ranked, regression,
                           prm=kind == "prm")
    except OSError as exc:
        _raise_write_error(exc, args.output_prefix)
    progress = _Progress(args.log_interval)
    published = False
    try:
        records = iter_records(files)
        for raw, result in _results(job, _chunks(records, args.chunk_size), args.workers):
            if result[0] == "ok":
                outputs.add(*result[1:5], result[6])
                tally.kept(result)
            else:
                outputs.reject(tally.rejected(raw, result[1], result[2]))
            progress.update(
                tally.counts["records"], sum(tally.tokens.values()), tally.counts["rejected"]
            )
        outputs.close()
        elapsed = progress.elapsed()
        progress.write("done: " + progress.line(
            tally.counts["records"], sum(tally.tokens.values()), tally.counts["rejected"]
        ))
        tally.check(args)
        names = [Path(final).name for _, final in outputs.paths]
        stats = _stats(args, job, files, tally, names, elapsed)
        outputs.publish(stats)
        published = True
        return stats
    except InputError as exc:
        raise PreprocessError(str(exc)) from exc
    except OSError as exc:
        _raise_write_error(exc, args.output_prefix)
    finally:
        progress.close()
        if not published:
            outputs.discard()


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tools/preprocess_data.py``; returns the exit status."""
    try:
        args = parse_args(argv)
        if threading.current_thread() is threading.main_thread():
            # SIGTERM unwinds like Ctrl-C so the temporary files are removed.
            signal.signal(signal.SIGTERM, _terminate)
        stats = run(args)
    except PreprocessError as exc:
        return cli.fail(exc)
    except KeyboardInterrupt:
        print("interrupted; no output written", file=sys.stderr)
        return 130
    counts = stats["counts"]
    what = {"sft": "SFT records", "ranked": "ranked records",
            "regression": "regression records", "prm": "step-labelled records"}.get(
        stats["kind"], stats["kind"].replace("_", " "))
    print(
        f"wrote {counts['kept']} {what} ({counts['rejected']} rejected, {counts['truncated']} "
        f"truncated{', ' + str(stats['steps']['cut_steps']) + ' steps cut' if 'steps' in stats else ''}) to {args.output_prefix}_packed_*_document.{{bin,idx}}; "
        f"stats in {stats_path(args.output_prefix)}",
        file=sys.stderr,
    )
    return 0
