"""Write critiques with a critique model: CLoud's stage 2, and the first half of scoring
with a critique model.

    python -m megarm.generate --model HF_CAUSAL_LM_EXPORT --input pairs.jsonl \\
        --output critiques.jsonl [--handler-name pairwise_messages] [--batch-size 16] \\
        [--max-new-tokens 256] [--do-sample --temperature 0.7 --top-p 0.95 --seed 0] \\
        [--backend transformers|vllm]

For every preference record (read with a preprocessing handler, ``--map-keys`` as
there) each response gets a critique: the model reads prompt + response + the
critique turn (``--critique-prompt``, the wording stage 3 trains with; see
:func:`megarm.data.templates.critique_turn`) and writes until its end-of-turn
token. The output holds one line per record, in input order: ``prompt``
(messages), ``chosen``, ``rejected``, ``chosen_critique``, ``rejected_critique``
(and ``margin`` when the handler found one), which ``tools/preprocess_data.py
--handler-name critique_pairs`` reads as it is. Records the handler refuses are
counted and left out.

Progress is written to ``<output>.partial`` as each batch finishes (flushed to
disk); after a crash the same command resumes after the last finished record (the
settings are kept beside it in ``<output>.partial.json`` and must match). The
output is renamed into place when every record is done.

The model is the HF ``*ForCausalLM`` export of a critique model
(``ckpt_convert/mcore2hf.py``), run with transformers ``generate`` (greedy unless
``--do-sample``, left-padded batches). ``--backend vllm`` uses vLLM when it is
installed (it is not a megarm dependency; that path is not tested here).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from megarm import cli
from megarm.data.encoding import TRUNCATION_POLICIES
from megarm.data.handlers import Pair, RecordError, get_handler
from megarm.data.readers import InputError, iter_records, resolve_inputs
from megarm.data.templates import DEFAULT_CRITIQUE_PROMPT
from megarm.rewards.critique import CritiqueWriter, GenerateError, Sampling

# --------------------------------------------------------------------------- the command


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m megarm.generate", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="HF causal-LM directory (the critique model's export)")
    p.add_argument("--input", required=True, help="preference records: file, directory or glob")
    p.add_argument("--output", required=True, help="critique pairs jsonl (stage 3's input)")
    p.add_argument("--handler-name", default="pairwise_messages", help="format of --input")
    p.add_argument("--map-keys", help='JSON renaming for the handler, e.g. {"prompt": "question"}')
    p.add_argument("--critique-prompt", default=DEFAULT_CRITIQUE_PROMPT,
                   help="the user turn asking for the critique (as in preprocessing)")
    p.add_argument("--tokenizer-name-or-path", help="tokenizer (default: the --model directory)")
    p.add_argument("--prompt-type", default="auto", help="chat format, as in preprocessing")
    p.add_argument("--seq-length", type=int, default=None,
                   help="max tokens of prompt + response + critique (default: the model's positions)")
    p.add_argument("--truncation", default="left", choices=TRUNCATION_POLICIES)
    p.add_argument("--batch-size", type=int, default=16, help="sequences per generate call")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--do-sample", action="store_true", help="sample (default: greedy)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--backend", default="transformers", choices=("transformers", "vllm"))
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"),
                   help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return p


def _done_indexes(partial: Path) -> list[dict[str, Any]]:
    """The complete lines of a partial output, up to the first damaged one (a line
    cut by a crash, even inside a UTF-8 character, or one without its index)."""
    lines = []
    for raw in partial.read_bytes().split(b"\n"):
        try:
            line = json.loads(raw.decode("utf-8"))
        except ValueError:  # UnicodeDecodeError included
            break
        if not isinstance(line, dict) or not isinstance(line.get("index"), int):
            break
        lines.append(line)
    return lines


def _fingerprint(paths: list[Path]) -> list[str]:
    """The sha256 of each input file: progress is kept by record index, so a resume
    must read the very same records."""
    out = []
    for path in paths:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        out.append(digest.hexdigest())
    return out


def _check_resume(partial: Path, settings_path: Path, settings: dict[str, Any]) -> None:
    """Refuse to resume a partial output written with other settings or inputs,
    naming the first setting that differs and both values."""
    try:
        before = json.loads(settings_path.read_text()) if settings_path.exists() else None
    except ValueError:
        before = None
    if not isinstance(before, dict):
        raise GenerateError(
            f"{partial} has no readable settings ({settings_path}); delete it to start over"
        )
    for key, value in settings.items():
        if before.get(key) != value:
            what = "the input files' contents" if key == "input_sha256" else f"{key}"
            raise GenerateError(
                f"{partial} was written with other settings: {what} was "
                f"{before.get(key)!r}, now {value!r}; run with the same arguments and inputs "
                f"to resume, or delete {partial} and {settings_path} to start over"
            )


def _read_pairs(inputs: list, handler: Any) -> tuple[list[tuple[int, Pair]], list[str]]:
    """Every record as ``(index, pair)``, or a skip line with its reason."""
    pairs: list[tuple[int, Pair]] = []
    skipped: list[str] = []
    for index, raw in enumerate(iter_records(inputs)):
        try:
            record = json.loads(raw.payload) if isinstance(raw.payload, bytes) else raw.payload
            if not isinstance(record, dict):
                raise RecordError("malformed_record", "the record is not a JSON object")
            pairs.append((index, handler(record)))
        except ValueError as exc:  # bad JSON
            skipped.append(f"record {index}: malformed_json ({exc})")
        except RecordError as exc:
            skipped.append(f"record {index}: {exc.reason} ({exc.detail})")
    return pairs, skipped


def _generate(
    writer: CritiqueWriter, partial: Path, done: list[dict[str, Any]],
    todo: list[tuple[int, Pair]], total: int, batch_size: int,
) -> list[str]:
    """Write ``done`` back, then the critiques of ``todo``, batch by batch, each batch
    flushed to disk before the next starts; the records skipped (a prompt and
    response that cannot fit the sequence length), with their reasons."""
    skipped = []
    from tqdm import tqdm

    # Write back the complete lines only: a line cut by the crash would end the file.
    with open(partial, "w", encoding="utf-8") as handle:
        for line in done:
            handle.write(json.dumps(line, ensure_ascii=False) + "\n")
        step = max(1, batch_size // 2)  # records per batch (two responses each)
        with tqdm(total=total, initial=total - len(todo), unit="rec",
                  desc="critiques", disable=None, file=sys.stderr) as bar:
            for start in range(0, len(todo), step):
                batch = []
                for index, pair in todo[start : start + step]:
                    try:
                        for response in (pair.chosen, pair.rejected):
                            writer.prompt_ids(pair.prompt, response)
                        batch.append((index, pair))
                    except RecordError as exc:
                        skipped.append(f"record {index}: {exc.reason} ({exc.detail})")
                        bar.update(1)
                items = [(p.prompt, r) for _, p in batch for r in (p.chosen, p.rejected)]
                texts = writer.critiques(items)
                for k, (index, pair) in enumerate(batch):
                    line = {"index": index, "prompt": pair.prompt, "chosen": pair.chosen,
                            "rejected": pair.rejected, "chosen_critique": texts[2 * k],
                            "rejected_critique": texts[2 * k + 1]}
                    if pair.margin is not None:
                        line["margin"] = pair.margin
                    handle.write(json.dumps(line, ensure_ascii=False) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
                bar.update(len(batch))
    return skipped


def run(args: argparse.Namespace) -> dict[str, int]:
    """Generate critiques for ``args.input``; return counts."""
    output = Path(args.output)
    partial = output.with_name(output.name + ".partial")
    settings_path = output.with_name(output.name + ".partial.json")
    if output.exists() and not args.overwrite:
        raise GenerateError(f"--output {output} exists; pass --overwrite or choose another name")
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise GenerateError("--batch-size and --max-new-tokens must be >= 1")
    try:
        inputs = resolve_inputs(args.input)
        map_keys = json.loads(args.map_keys) if args.map_keys else None
        if map_keys is not None and not isinstance(map_keys, dict):
            raise ValueError('--map-keys must be a JSON object like {"prompt": "question"}')
        handler = get_handler(args.handler_name, map_keys)
    except (InputError, ValueError) as exc:
        raise GenerateError(str(exc)) from exc
    if any(cli.is_same_file(output, path) for path in inputs):  # symlinks, hard links
        raise GenerateError(f"--output {output} is an input file; write the critiques elsewhere")
    sampling = Sampling(args.max_new_tokens, args.do_sample, args.temperature, args.top_p, args.seed)
    settings = {
        "input": [str(p) for p in inputs], "model": str(Path(args.model).resolve()),
        "handler": args.handler_name, "map_keys": map_keys, "critique_prompt": args.critique_prompt,
        "prompt_type": args.prompt_type, "sampling": asdict(sampling),
        # Everything else that changes an output line.
        "tokenizer": args.tokenizer_name_or_path, "seq_length": args.seq_length,
        "truncation": args.truncation, "dtype": args.dtype, "backend": args.backend,
        "input_sha256": _fingerprint(inputs),
    }
    done: list[dict[str, Any]] = []
    if partial.exists():
        _check_resume(partial, settings_path, settings)
        done = _done_indexes(partial)
        print(f"resuming after {len(done)} records in {partial}", file=sys.stderr, flush=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    settings_path.write_text(json.dumps(settings, indent=1) + "\n")

    pairs, skipped = _read_pairs(inputs, handler)
    finished = {line["index"] for line in done}
    todo = [(i, p) for i, p in pairs if i not in finished]
    writer = CritiqueWriter(
        args.model, args.critique_prompt, sampling, args.batch_size, args.backend,
        args.prompt_type, args.tokenizer_name_or_path, args.seq_length, args.truncation, args.dtype,
    )
    if args.do_sample:
        import torch

        torch.manual_seed(args.seed)
    skipped += _generate(writer, partial, done, todo, len(pairs), args.batch_size)
    lines = sorted(_done_indexes(partial), key=lambda line: line["index"])
    with open(partial, "w", encoding="utf-8") as handle:
        for line in lines:
            handle.write(json.dumps(line, ensure_ascii=False) + "\n")
    os.replace(partial, output)
    settings_path.unlink(missing_ok=True)
    for reason in skipped[:3]:
        print(f"skipped {reason}", file=sys.stderr)
    print(f"wrote {len(lines)} critique pairs to {output} ({len(skipped)} records skipped)",
          file=sys.stderr, flush=True)
    return {"written": len(lines), "skipped": len(skipped), "generated": len(todo)}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for bad input)."""
    return cli.run_command(build_parser(), run, argv, (GenerateError,))


if __name__ == "__main__":
    sys.exit(main())
