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
import errno
import glob
import json
import os
import signal
import sys
import threading
import time
import warnings
from array import array
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from megarm.data.blend import PACKED_RE, SFT_KEYS
from megarm.data.dataset import (
    IGNORE_INDEX,
    MARGIN_KEY,
    PAIR_KEYS,
    megatron_indexed_dataset,
    packed_path,
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
from megarm.data.readers import InputError, iter_records, record_unit, resolve_inputs
from megarm.data.templates import (
    DEFAULT_CRITIQUE_PROMPT,
    PROMPT_TYPES,
    TemplateError,
    get_template,
    reward_convention,
)
from megarm.data.tokenizer import HF_TOKENIZER_TYPES, TokenizerError, load_tokenizer, vocab_sha256


class PreprocessError(RuntimeError):
    """A run that cannot produce output; the message says what to fix."""


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
        "--max-reject-fraction",
        type=float,
        default=0.5,
        help="fail (and write nothing) if more than this fraction of records is rejected",
    )
    p.add_argument("--log-interval", type=int, default=1000, help="progress line every K records")
    p.add_argument("--chunk-size", type=int, default=128, help="records per worker task")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the files of an existing --output-prefix (refused without it)",
    )
    return p


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
    for name, low in (("workers", 1), ("log_interval", 1), ("chunk_size", 1), ("seq_length", 2)):
        value = getattr(args, name)
        if value is not None and value < low:
            raise PreprocessError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    if not 0 <= args.max_reject_fraction <= 1:
        raise PreprocessError(
            f"--max-reject-fraction must be in [0, 1], got {args.max_reject_fraction}"
        )
    return args


# --------------------------------------------------------------------------- output


def existing_outputs(prefix: str) -> list[str]:
    """The final files of an earlier run under ``prefix``: its stats.json, rejects and
    every ``<prefix>_packed_<key>_document.{bin,idx}`` (whatever the key)."""
    found = [path for path in (stats_path(prefix), rejects_path(prefix)) if os.path.exists(path)]
    for path in sorted(glob.glob(glob.escape(prefix) + "_packed_*_document.*")):
        rest = path[len(prefix) :]
        if path.endswith((".bin", ".idx")) and PACKED_RE.fullmatch(rest[:-4]) is not None:
            found.append(path)
    return found


_NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def write_error(exc: OSError, prefix: str) -> PreprocessError | None:
    """The one-line error for a failed write under ``prefix`` (``None``: not a write
    problem, e.g. an unreadable input)."""
    where = os.path.dirname(os.path.abspath(prefix))
    name = f" ({exc.filename})" if exc.filename else ""
    if exc.errno in _NO_SPACE:
        return PreprocessError(
            f"no space left on {where} (or a file-size limit) while writing the output"
            f"{name}: {exc.strerror}; nothing was written. Free space or choose another "
            "--output-prefix"
        )
    if exc.errno in _NOT_WRITABLE and (
        exc.filename is None or os.path.abspath(str(exc.filename)).startswith(where)
    ):
        return PreprocessError(
            f"--output-prefix {prefix}: cannot write to {where}{name}: {exc.strerror}; choose "
            "a writable --output-prefix"
        )
    return None


def _raise_write_error(exc: OSError, prefix: str) -> NoReturn:
    error = write_error(exc, prefix)
    if error is None:
        raise exc
    raise error from exc


class _Outputs:
    """The temporary files of one run and their promotion to final names."""

    def __init__(self, prefix: str, has_margin: bool, sft: bool = False) -> None:
        IndexedDatasetBuilder = megatron_indexed_dataset().IndexedDatasetBuilder
        self.prefix = prefix
        self.tmp_prefix = f"{prefix}.tmp-{os.getpid()}"
        self.keys = SFT_KEYS if sft else PAIR_KEYS + ((MARGIN_KEY,) if has_margin else ())
        self.paths: list[tuple[str, str]] = []  # (temporary, final)
        self.builders = {}
        self.rejects = None
        self.stats = (stats_path(self.tmp_prefix), stats_path(prefix))
        for key in self.keys:
            tmp, final = packed_path(self.tmp_prefix, key), packed_path(prefix, key)
            self.paths += [(tmp + ".bin", final + ".bin"), (tmp + ".idx", final + ".idx")]
        self.paths.append((rejects_path(self.tmp_prefix), rejects_path(prefix)))
        try:
            for key in self.keys:
                dtype = np.float32 if key == MARGIN_KEY else np.int32
                tmp = packed_path(self.tmp_prefix, key) + ".bin"
                self.builders[key] = IndexedDatasetBuilder(tmp, dtype=dtype)
            self.rejects = open(rejects_path(self.tmp_prefix), "w", encoding="utf-8")
        except BaseException:
            self.discard()  # the files opened so far
            raise

    def add(
        self,
        prompt: np.ndarray,
        chosen: np.ndarray,
        rejected: np.ndarray | None,
        margin: float | None,
        supervised: tuple[int, ...] = (0, 0),
    ) -> None:
        """One record: a pair (``chosen`` / ``rejected`` tails after the prompt), or an
        SFT record (``chosen`` is its target, ``rejected`` ``None``). Labels are -100
        over the prompt and the first ``supervised[k]`` tokens of tail ``k``."""
        if rejected is None:
            sequences = [("", chosen, supervised[0])]
        else:
            sequences = [("chosen_", chosen, supervised[0]), ("rejected_", rejected, supervised[1])]
        for side, tail, start in sequences:
            tokens = np.concatenate([prompt, tail])
            labels = tokens.copy()
            labels[: len(prompt) + start] = IGNORE_INDEX
            self.builders[f"{side}input_ids"].add_document(tokens, [len(tokens)])
            self.builders[f"{side}labels"].add_document(labels, [len(labels)])
        if MARGIN_KEY in self.builders:
            self.builders[MARGIN_KEY].add_document(np.array([margin], dtype=np.float32), [1])

    def reject(self, entry: dict[str, Any]) -> None:
        self.rejects.write(json.dumps(entry, ensure_ascii=False, default=repr) + "\n")

    def close(self) -> None:
        """Write the .idx files; the data is complete but still under temporary names."""
        for key in self.keys:
            self.builders[key].finalize(packed_path(self.tmp_prefix, key) + ".idx")
        self.rejects.close()

    def publish(self, stats: dict[str, Any]) -> None:
        """Write stats.json and rename everything to final names, stats.json last so
        its presence means the set is complete. Files of an earlier run under the
        prefix that this run does not write (e.g. an old ``_margin``) are removed, so
        the prefix holds exactly what stats.json lists."""
        tmp_stats, final_stats = self.stats
        Path(tmp_stats).write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
        if os.path.exists(final_stats):
            os.remove(final_stats)
        ours = {final for _, final in self.paths}
        for stale in existing_outputs(self.prefix):
            if stale not in ours and stale != final_stats:
                os.remove(stale)
        for tmp, final in self.paths:
            os.replace(tmp, final)
        os.replace(tmp_stats, final_stats)

    def discard(self) -> None:
        """Remove every temporary file (on failure or interruption). Closing may fail
        again (the disk that was full still is); the files are removed regardless."""
        handles = [builder.data_file for builder in self.builders.values()]
        for handle in [*handles, self.rejects]:
            if handle is not None:
                with contextlib.suppress(OSError):
                    handle.close()
        for tmp, _ in [*self.paths, self.stats]:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)


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


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Preprocess per ``args`` (from :func:`parse_args`); return the stats written."""
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
    except (InputError, TokenizerError, TemplateError, ValueError) as exc:
        raise PreprocessError(str(exc)) from exc
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
    )
    sft = handler.kind == "sft"
    critiques = handler.name == "critique_pairs"
    sides = ("sequences",) if sft else ("chosen", "rejected")
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
            stacklevel=2,
        )

    units = [record_unit(path) for path in files]
    counts = {"records": 0, "kept": 0, "rejected": 0, "truncated": 0}
    reasons = dict.fromkeys(REJECT_REASONS, 0)
    lengths = {side: array("i") for side in sides}
    tokens = dict.fromkeys(sides, 0)
    supervised_tokens = 0
    examples: list[str] = []  # the first rejects, quoted if the run fails
    max_token_id = -1  # checked against the model's vocabulary before training

    try:
        outputs = _Outputs(args.output_prefix, handler.has_margin, sft)
    except OSError as exc:
        _raise_write_error(exc, args.output_prefix)
    progress = _Progress(args.log_interval)
    published = False
    try:
        records = iter_records(files)
        for raw, result in _results(job, _chunks(records, args.chunk_size), args.workers):
            counts["records"] += 1
            if result[0] == "ok":
                _, prompt, chosen, rejected, margin, truncated, supervised = result
                outputs.add(prompt, chosen, rejected, margin, supervised)
                tails = [chosen] if rejected is None else [chosen, rejected]
                for ids in (prompt, *tails):
                    if len(ids):
                        max_token_id = max(max_token_id, int(ids.max()))
                counts["kept"] += 1
                counts["truncated"] += int(truncated)
                for side, tail, start in zip(sides, tails, supervised, strict=True):
                    lengths[side].append(len(prompt) + len(tail))
                    tokens[side] += len(prompt) + len(tail)
                    supervised_tokens += len(tail) - start
            else:
                _, reason, detail = result
                counts["rejected"] += 1
                reasons[reason] += 1
                if len(examples) < 3:
                    where = f"{files[raw.source]}:{units[raw.source]} {raw.index}"
                    examples.append(f"{where}: {reason} ({detail})")
                payload = raw.payload
                outputs.reject(
                    {
                        "source": str(files[raw.source]),
                        units[raw.source]: raw.index,
                        "reason": reason,
                        "detail": detail,
                        **(
                            {"raw": payload.decode("utf-8", errors="replace").rstrip("\n")}
                            if isinstance(payload, bytes)
                            else {"record": payload}
                        ),
                    }
                )
            progress.update(
                counts["records"], sum(tokens.values()), counts["rejected"]
            )
        outputs.close()
        elapsed = progress.elapsed()
        progress.write(
            "done: " + progress.line(counts["records"], sum(tokens.values()), counts["rejected"])
        )

        if counts["records"] == 0:
            raise PreprocessError(f"input {args.input!r} holds no records")
        fraction = counts["rejected"] / counts["records"]
        if counts["kept"] == 0 or fraction > args.max_reject_fraction:
            top = ", ".join(f"{r}={n}" for r, n in reasons.items() if n)
            raise PreprocessError(
                f"{counts['rejected']} of {counts['records']} records rejected ({fraction:.1%} > "
                f"--max-reject-fraction {args.max_reject_fraction}): {top}; first: "
                + "; ".join(examples)
                + ". Check --handler-name and --map-keys against the data, or raise "
                "--max-reject-fraction"
            )
        stats = {
            "megarm_version": megarm_version(),
            "handler": handler.name,
            # What the files hold: pairs, critique pairs (critiques supervised) or SFT.
            "kind": "sft" if sft else "critique_pairs" if critiques else "pairs",
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
                    template, tokenizer, args.critique_prompt if critiques else None
                ),
            },
            "inputs": [str(path) for path in files],
            "counts": counts,
            "rejects": reasons,
            "lengths": {side: _percentiles(values) for side, values in lengths.items()},
            "tokens": tokens,
            "supervised_tokens": supervised_tokens,
            "has_margin": handler.has_margin,
            "max_token_id": max_token_id,
            "seq_length": args.seq_length,
            "files": [Path(final).name for _, final in outputs.paths],
            "elapsed_s": round(elapsed, 3),
            "records_per_s": round(counts["records"] / elapsed, 1),
            "tokens_per_s": round(sum(tokens.values()) / elapsed, 1),
            "arguments": {k: v for k, v in vars(args).items()},
        }
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
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; no output written", file=sys.stderr)
        return 130
    counts = stats["counts"]
    what = "SFT records" if stats["kind"] == "sft" else stats["kind"].replace("_", " ")
    print(
        f"wrote {counts['kept']} {what} ({counts['rejected']} rejected, {counts['truncated']} "
        f"truncated) to {args.output_prefix}_packed_*_document.{{bin,idx}}; "
        f"stats in {stats_path(args.output_prefix)}",
        file=sys.stderr,
    )
    return 0
