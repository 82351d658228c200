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
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from megarm.data.handlers import Messages, Pair, RecordError, get_handler
from megarm.data.preprocess import TRUNCATION_POLICIES, fit_prompt
from megarm.data.readers import InputError, iter_records, resolve_inputs
from megarm.data.templates import DEFAULT_CRITIQUE_PROMPT, critique_turn, get_template


class GenerateError(RuntimeError):
    """Generation cannot start or resume; the message says what to change."""


@dataclass(frozen=True)
class Sampling:
    """How critiques are decoded (recorded with a partial output)."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


class CritiqueWriter:
    """A critique model and its chat template: ``critiques(items)`` writes one
    critique per ``(prompt messages, response)``.

    ``model`` is an HF causal-LM directory (with its tokenizer, or ``tokenizer``
    given). Rows are built as preprocessing builds them: the templated prompt (cut
    by ``truncation`` so the row fits ``seq_length`` with ``max_new_tokens`` to
    spare), then the response and critique turn, tokenized separately."""

    def __init__(
        self,
        model: str,
        critique_prompt: str = DEFAULT_CRITIQUE_PROMPT,
        sampling: Sampling = Sampling(),
        batch_size: int = 16,
        backend: str = "transformers",
        prompt_type: str = "auto",
        tokenizer: str | None = None,
        seq_length: int | None = None,
        truncation: str = "left",
        dtype: str = "auto",
    ) -> None:
        from megarm.data.templates import TemplateError
        from megarm.data.tokenizer import TokenizerError, load_tokenizer

        if not (Path(model) / "config.json").is_file():
            raise GenerateError(f"--model {model} is not an HF model directory (no config.json)")
        try:
            self.tokenizer = load_tokenizer(tokenizer or model)
            self.template = get_template(prompt_type, self.tokenizer)
        except (TokenizerError, TemplateError) as exc:
            raise GenerateError(str(exc)) from exc
        if truncation not in TRUNCATION_POLICIES:
            raise GenerateError(f"--truncation {truncation!r}: choose from {TRUNCATION_POLICIES}")
        self.critique_prompt = critique_prompt
        self.sampling = sampling
        self.batch_size = batch_size
        self.truncation = truncation
        self.end_id = int(self.tokenizer.convert_tokens_to_ids(self.template.end_of_turn))
        self.header_len = len(self._ids([self.template.header])[0])
        config = json.loads((Path(model) / "config.json").read_text())
        self.seq_length = seq_length or config.get("max_position_embeddings")
        self.backend = backend
        if backend == "vllm":
            self._engine = _vllm_engine(model, dtype)
        elif backend == "transformers":
            self._engine = _transformers_model(model, dtype)
        else:
            raise GenerateError(f"--backend {backend!r}: choose transformers or vllm")

    def _ids(self, texts: list[str]) -> list[list[int]]:
        return [list(x) for x in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def prompt_ids(self, prompt: Messages, response: str) -> tuple[list[int], list[int]]:
        """``(prompt ids, response + critique turn ids)`` the critique is written after
        (and that scoring puts before it), the prompt cut as preprocessing cuts it."""
        head, rest = critique_turn(self.template, prompt, response, self.critique_prompt)
        head_ids, rest_ids = self._ids([head, rest])
        budget = len(rest_ids) + self.sampling.max_new_tokens
        head_ids, _ = fit_prompt(head_ids, budget, self.seq_length, self.header_len, self.truncation)
        return head_ids, rest_ids

    def critiques(self, items: Sequence[tuple[Messages, str]]) -> list[str]:
        """One critique per ``(prompt, response)``, in order."""
        rows = [sum(self.prompt_ids(prompt, response), []) for prompt, response in items]
        out: list[str] = []
        for start in range(0, len(rows), self.batch_size):
            out += self._generate(rows[start : start + self.batch_size])
        return out

    def _generate(self, rows: list[list[int]]) -> list[str]:
        s = self.sampling
        if self.backend == "vllm":
            from vllm import SamplingParams

            params = SamplingParams(
                max_tokens=s.max_new_tokens,
                temperature=s.temperature if s.do_sample else 0.0,
                top_p=s.top_p if s.do_sample else 1.0,
                seed=s.seed,
                stop_token_ids=[self.end_id],
            )
            prompts = [{"prompt_token_ids": row} for row in rows]
            return [r.outputs[0].text for r in self._engine.generate(prompts, params, use_tqdm=False)]
        import torch

        model = self._engine
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.end_id
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):  # left padding: every row ends where generation starts
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
        extra = {"temperature": s.temperature, "top_p": s.top_p} if s.do_sample else {}
        with torch.no_grad():
            out = model.generate(
                input_ids=ids.to(model.device),
                attention_mask=mask.to(model.device),
                max_new_tokens=s.max_new_tokens,
                do_sample=s.do_sample,
                eos_token_id=self.end_id,
                pad_token_id=pad,
                **extra,
            )
        texts = []
        for new in out[:, width:].tolist():
            if self.end_id in new:
                new = new[: new.index(self.end_id)]
            texts.append(self.tokenizer.decode(new, skip_special_tokens=False))
        return texts


def _transformers_model(model: str, dtype: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    from megarm import platform

    dtypes = {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32}
    chosen = dtypes[dtype] or (torch.bfloat16 if platform.is_cuda() else torch.float32)
    return AutoModelForCausalLM.from_pretrained(model, dtype=chosen).to(platform.device()).eval()


def _vllm_engine(model: str, dtype: str) -> Any:
    try:
        from vllm import LLM
    except ImportError as exc:
        raise GenerateError(
            f"--backend vllm needs vLLM ({exc}); pip install vllm, or use --backend transformers"
        ) from exc
    return LLM(model=model, dtype={"auto": "auto", "bf16": "bfloat16", "fp32": "float32"}[dtype])


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
    """The complete lines of a partial output (a line cut by a crash is dropped)."""
    lines = []
    for line in partial.read_text(encoding="utf-8").splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            break
    return lines


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
        handler = get_handler(args.handler_name, map_keys)
    except (InputError, ValueError) as exc:
        raise GenerateError(str(exc)) from exc
    if any(output.resolve() == path.resolve() for path in inputs):
        raise GenerateError(f"--output {output} is an input file; write the critiques elsewhere")
    sampling = Sampling(args.max_new_tokens, args.do_sample, args.temperature, args.top_p, args.seed)
    settings = {
        "input": [str(p) for p in inputs], "model": str(Path(args.model).resolve()),
        "handler": args.handler_name, "map_keys": map_keys, "critique_prompt": args.critique_prompt,
        "prompt_type": args.prompt_type, "sampling": asdict(sampling),
    }
    done: list[dict[str, Any]] = []
    if partial.exists():
        before = json.loads(settings_path.read_text()) if settings_path.exists() else None
        if before != settings:
            raise GenerateError(
                f"{partial} was written with other settings ({settings_path}); delete both to "
                "start over, or run with the same arguments to resume"
            )
        done = _done_indexes(partial)
        print(f"resuming after {len(done)} records in {partial}", file=sys.stderr, flush=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    settings_path.write_text(json.dumps(settings, indent=1) + "\n")

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
    finished = {line["index"] for line in done}
    todo = [(i, p) for i, p in pairs if i not in finished]
    writer = CritiqueWriter(
        args.model, args.critique_prompt, sampling, args.batch_size, args.backend,
        args.prompt_type, args.tokenizer_name_or_path, args.seq_length, args.truncation, args.dtype,
    )
    if args.do_sample:
        import torch

        torch.manual_seed(args.seed)
    from tqdm import tqdm

    # Write back the complete lines only: a line cut by the crash would end the file.
    with open(partial, "w", encoding="utf-8") as handle:
        for line in done:
            handle.write(json.dumps(line, ensure_ascii=False) + "\n")
        step = max(1, args.batch_size // 2)  # records per batch (two responses each)
        with tqdm(total=len(pairs), initial=len(pairs) - len(todo), unit="rec",
                  desc="critiques", disable=None, file=sys.stderr) as bar:
            for start in range(0, len(todo), step):
                batch = todo[start : start + step]
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
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except GenerateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
