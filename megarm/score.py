"""Score responses with a trained (or converted) megarm reward model.

    torchrun --nproc_per_node N -m megarm.score --load MCORE_DIR --input FILE \\
        --output rewards.jsonl [--handler-name NAME] [--tokenizer-name-or-path DIR] \\
        [--tensor-model-parallel-size T] [--pipeline-model-parallel-size P] \\
        [--micro-batch-size B]

Input records (jsonl/json/parquet/csv/arrow, read by :mod:`megarm.data.readers`):

- preference pairs, turned into (prompt, chosen, rejected) by the same handlers as
  ``tools/preprocess_data.py`` (``--handler-name``; default ``pairwise_messages`` for
  records with ``chosen``/``rejected``); output ``chosen_reward``/``rejected_reward``
  per record, and the pair accuracy (chosen scored higher) is printed;
- single responses ``{"prompt": str | messages, "response": str}`` (optional
  ``system``); output ``reward``.

Text is formatted exactly as preprocessing formats it: the chat template (the
tokenizer's own with ``--prompt-type auto``) renders the prompt up to the assistant
header, the response gets the end-of-turn marker, and the two are tokenized
separately and concatenated, so the reward is read at the same end-of-turn token the
model was trained on. Rows are right-padded (reward at ``length - 1``, plain causal
attention, exact for right padding) and run through megatron-core's pipeline
schedule with ``forward_only``. Rank 0 gathers the rewards and writes one line per
input record, in input order (``{"index": i, "error": ...}`` for records the handler
rejects).

The model shape comes from the checkpoint itself (the ``megarm_config`` saved with
every megarm checkpoint, or a ``config.json`` beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


class ScoreError(RuntimeError):
    """Scoring cannot start; the message says what to pass."""


# --------------------------------------------------------------------------- checkpoint


# --------------------------------------------------------------------------- records


@dataclass
class Item:
    """One input record after formatting: 1 row (single), 2 rows (pair) or an error."""

    index: int
    kind: str  # "pair" | "single" | "error"
    rows: list[list[int]] = field(default_factory=list)
    error: str | None = None


def _messages(value: Any, what: str) -> list[dict[str, str]]:
    """A prompt given as text (one user turn) or as a list of role/content messages."""
    from megarm.data.handlers import RecordError

    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if (
        isinstance(value, list)
        and value
        and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in value
        )
    ):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise RecordError(
        "malformed_record", f"{what} must be text or a non-empty list of role/content messages"
    )


class Formatter:
    """Record -> token rows, with the handlers, templates and tokenizer of preprocessing."""

    def __init__(
        self,
        tokenizer: Any,
        prompt_type: str = "auto",
        handler_name: str | None = None,
        map_keys: dict[str, Any] | None = None,
        seq_length: int | None = None,
    ) -> None:
        from megarm.data.handlers import get_handler
        from megarm.data.templates import get_template

        self.tokenizer = tokenizer
        self.template = get_template(prompt_type, tokenizer)
        self.forced = get_handler(handler_name, map_keys) if handler_name else None
        self.pairs = get_handler("pairwise_messages")
        self.seq_length = seq_length
        self.header_len = len(self._encode([self.template.header])[0])

    def _encode(self, texts: list[str]) -> list[list[int]]:
        # As preprocessing does: no BOS/EOS added, the template carries the specials.
        return list(self.tokenizer(texts, add_special_tokens=False)["input_ids"])

    def __call__(self, index: int, payload: bytes | dict[str, Any]) -> Item:
        """Format one raw record (a jsonl line or a dict); a prompt too long for
        ``seq_length`` is cut from the left, as preprocessing's default does."""
        from megarm.data.handlers import RecordError
        from megarm.data.preprocess import fit_prompt

        try:
            record = json.loads(payload) if isinstance(payload, (bytes, str)) else payload
        except ValueError as exc:  # includes bad UTF-8
            return Item(index, "error", error=f"malformed_json: {exc}")
        try:
            if not isinstance(record, dict):
                raise RecordError("malformed_record", "the record is not a JSON object")
            single = (
                self.forced is None
                and "response" in record
                and not ("chosen" in record or "rejected" in record)
            )
            if single:
                messages = _messages(record.get("prompt"), "prompt")
                system = record.get("system")
                if isinstance(system, str) and system.strip() and messages[0]["role"] != "system":
                    messages = [{"role": "system", "content": system}, *messages]
                response = record["response"]
                if not isinstance(response, str) or not response.strip():
                    raise RecordError("empty_response", "response is empty or not text")
                prompt_text, responses = self.template.prompt(messages), [response]
            else:
                handler = self.forced or self.pairs
                pair = handler(record)
                prompt_text = self.template.prompt(pair.prompt)
                responses = [pair.chosen, pair.rejected]
            ids = self._encode([prompt_text] + [self.template.response(r) for r in responses])
            prompt, _ = fit_prompt(
                ids[0], max(len(r) for r in ids[1:]), self.seq_length, self.header_len
            )
            rows = [prompt + response for response in ids[1:]]
            return Item(index, "single" if single else "pair", rows)
        except RecordError as exc:
            return Item(index, "error", error=f"{exc.reason}: {exc.detail}")


# --------------------------------------------------------------------------- batches


@dataclass
class ScoreBatch:
    """Right-padded rows of one micro-batch and their global row numbers."""

    tokens: Tensor
    position_ids: Tensor
    reward_index: Tensor
    rows: Tensor
    attention_mask: Tensor | None = None


def make_batches(rows: list[list[int]], micro_batch_size: int, pad_id: int) -> list[ScoreBatch]:
    """Micro-batches of ``micro_batch_size`` rows, longest rows first (less padding);
    ``rows`` numbers map rewards back to input order."""
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r]))
    batches = []
    for start in range(0, len(order), micro_batch_size):
        ids = order[start : start + micro_batch_size]
        seq = max(len(rows[r]) for r in ids)
        tokens = torch.full((len(ids), seq), pad_id, dtype=torch.long)
        for i, r in enumerate(ids):
            tokens[i, : len(rows[r])] = torch.tensor(rows[r], dtype=torch.long)
        batches.append(
            ScoreBatch(
                tokens=tokens,
                position_ids=torch.arange(seq).expand(len(ids), seq).contiguous(),
                reward_index=torch.tensor([len(rows[r]) - 1 for r in ids]),
                rows=torch.tensor(ids),
            )
        )
    return batches


def _collect(batch: ScoreBatch, rewards: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    # The schedule wants a loss; scoring has none.
    return rewards.sum() * 0.0, {"rewards": rewards.detach().float().cpu(), "rows": batch.rows}


def score_step(data_iterator: Iterator[ScoreBatch], model: torch.nn.Module):
    """megatron-core forward step for scoring (every stage reads the same batch)."""
    batch: ScoreBatch = next(data_iterator)
    device = next(model.parameters()).device
    output = model(
        batch.tokens.to(device),
        batch.position_ids.to(device),
        None if batch.attention_mask is None else batch.attention_mask.to(device),
        batch.reward_index.to(device),
    )
    return output, partial(_collect, batch)


def run_model(model: list[torch.nn.Module], batches: list[ScoreBatch]) -> dict[int, float]:
    """Rewards by row number for ``batches``, on the ranks that hold the value head
    (TP rank 0 of the last stage); an empty dict elsewhere."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not batches:
        return {}
    for chunk in model:
        chunk.eval()
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=score_step,
            data_iterator=iter(batches),
            model=model[0],
            num_microbatches=len(batches),
            seq_length=max(b.tokens.shape[1] for b in batches),
            micro_batch_size=max(b.tokens.shape[0] for b in batches),
            forward_only=True,
        )
    if not (ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0):
        return {}
    found: dict[int, float] = {}
    for out in outputs:
        found.update(zip(out["rows"].tolist(), out["rewards"].tolist(), strict=True))
    return found


# --------------------------------------------------------------------------- driver


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m megarm.score", description=__doc__.split("\n")[0])
    p.add_argument("--load", required=True, help="megarm torch_dist checkpoint directory")
    p.add_argument("--input", required=True, help="records: file, directory or glob")
    p.add_argument("--output", required=True, help="rewards jsonl (one line per input record)")
    p.add_argument("--iteration", type=int, default=None, help="checkpoint iteration to load")
    p.add_argument("--handler-name", help="pair format (default: pairwise_messages / single)")
    p.add_argument("--map-keys", help='JSON renaming for the handler, e.g. {"prompt": "question"}')
    p.add_argument("--prompt-type", default="auto", help="chat format, as in preprocessing")
    p.add_argument(
        "--tokenizer-name-or-path", help="tokenizer directory (default: the --load directory)"
    )
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--micro-batch-size", type=int, default=8, help="sequences per forward")
    p.add_argument(
        "--seq-length", type=int, default=None, help="cut prompts (from the left) to fit this"
    )
    p.add_argument(
        "--params-dtype",
        choices=("auto", "bf16", "fp16", "fp32"),
        default="auto",
        help="compute dtype (auto: bf16 on CUDA, fp32 on CPU)",
    )
    return p


def _tokenizer_dir(args: argparse.Namespace) -> str:
    if args.tokenizer_name_or_path:
        return args.tokenizer_name_or_path
    load = Path(args.load)
    if any((load / name).is_file() for name in TOKENIZER_MARKERS):
        return str(load)
    raise ScoreError(
        f"{load} holds no tokenizer files; pass --tokenizer-name-or-path (or convert with "
        "ckpt_convert/hf2mcore.py --tokenizer-model DIR, which copies them)"
    )


def prepare(args: argparse.Namespace) -> tuple[list[Item], int]:
    """Read and format every record (each rank does the same, deterministic work)."""
    from megarm.data.readers import InputError, iter_records, resolve_inputs
    from megarm.data.templates import TemplateError
    from megarm.data.tokenizer import TokenizerError, load_tokenizer

    try:
        tokenizer = load_tokenizer(_tokenizer_dir(args))
        map_keys = json.loads(args.map_keys) if args.map_keys else None
        formatter = Formatter(
            tokenizer, args.prompt_type, args.handler_name, map_keys, args.seq_length
        )
        records = iter_records(resolve_inputs(args.input))
        items = [formatter(i, raw.payload) for i, raw in enumerate(records)]
    except (InputError, TokenizerError, TemplateError, ValueError) as exc:
        # ValueError: an unknown handler, bad --map-keys JSON or keys.
        raise ScoreError(str(exc)) from exc
    if not items:
        raise ScoreError(f"--input {args.input} holds no records")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return items, int(pad)


def write_output(path: Path, items: list[Item], rewards: dict[int, float]) -> dict[str, Any]:
    """Write one line per record, in input order; return counts and pair accuracy."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    row = 0
    pairs = correct = singles = errors = 0
    with open(tmp, "w", encoding="utf-8") as out:
        for item in items:
            line: dict[str, Any] = {"index": item.index}
            if item.kind == "pair":
                chosen, rejected = rewards[row], rewards[row + 1]
                line.update(chosen_reward=chosen, rejected_reward=rejected)
                pairs += 1
                correct += int(chosen > rejected)
            elif item.kind == "single":
                line["reward"] = rewards[row]
                singles += 1
            else:
                line["error"] = item.error
                errors += 1
            row += len(item.rows)
            out.write(json.dumps(line) + "\n")
    os.replace(tmp, path)
    return {
        "pairs": pairs,
        "accuracy": correct / pairs if pairs else None,
        "singles": singles,
        "errors": errors,
    }


def score(args: argparse.Namespace) -> dict[str, Any] | None:
    """Score ``args.input`` in the process group of this launch; rank 0 writes the
    output and returns the summary (other ranks return ``None``)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megarm import distributed
    from megarm.config import ConfigError, check, load_config
    from megarm.model.builder import build_model
    from megarm.training.checkpointing import checkpoint_model_overrides, load_model_weights

    world = distributed.world_size_from_environ()
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if args.micro_batch_size < 1:
        raise ScoreError("--micro-batch-size must be >= 1")
    try:
        overrides = checkpoint_model_overrides(args.load, args.iteration)
    except FileNotFoundError as exc:
        raise ScoreError(str(exc)) from exc
    overrides += [
        f"model.params_dtype={args.params_dtype}",
        f"parallel.tensor_model_parallel_size={tp}",
        f"parallel.pipeline_model_parallel_size={pp}",
        "training.micro_batch_size=1",
        f"training.global_batch_size={max(world // max(tp * pp, 1), 1)}",
    ]
    try:
        cfg = load_config(None, overrides)
        cfg.data.seq_length = cfg.model.max_position_embeddings
        check(cfg, world)
    except ConfigError as exc:
        raise ScoreError(str(exc)) from exc
    items, pad_id = prepare(args)
    rows = [row for item in items for row in item.rows]
    too_long = max((len(r) for r in rows), default=0)
    if too_long > cfg.model.max_position_embeddings:
        raise ScoreError(
            f"a sequence has {too_long} tokens, more than the model's "
            f"{cfg.model.max_position_embeddings} positions; pass --seq-length"
        )

    with distributed.distributed(tp, pp, seed=cfg.training.seed) as launch:
        model = build_model(cfg)
        load_model_weights(args.load, model, args.iteration)
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        batches = make_batches(rows, args.micro_batch_size, pad_id)[dp_rank::dp]
        found = run_model(model, batches)
        gathered: list[Any] | None = [None] * launch.world_size if launch.rank == 0 else None
        dist.gather_object(found, gathered, dst=0)
        if launch.rank != 0:
            return None
        rewards: dict[int, float] = {}
        for part in gathered or []:
            rewards.update(part)
        if len(rewards) != len(rows):
            raise RuntimeError(f"got rewards for {len(rewards)} of {len(rows)} sequences")
        summary = write_output(Path(args.output), items, rewards)
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
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        score(args)
    except ScoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
