"""Padding with and without sequence packing on real HH-RLHF pair lengths.

Reads HH-RLHF transcripts (``{"chosen": ..., "rejected": ...}`` per line, gzip or
plain), splits them with the ``hh_rlhf`` handler, renders prompt + response with the
tokenizer's chat template, and batches the pairs in file order into micro-batches of
``--micro-batch-size`` pairs. Without packing a micro-batch is ``2b`` rows padded to
its longest sequence; with packing (``data.packing``) the ``2b`` sequences are packed
first-fit-decreasing into rows of ``--seq-length`` (:mod:`megarm.data.packing`).
Prints padded tokens / total tokens for both.

    python tools/packing_stats.py --input ../shared/data/hh_rlhf_harmless_1800.jsonl.gz
"""

from __future__ import annotations

import argparse
import gzip
import json
import tempfile
from pathlib import Path
from typing import Any

from megarm.data.packing import pack_lengths, row_width


def pair_lengths(path: str, tokenizer: Any) -> list[tuple[int, int]]:
    """``(chosen, rejected)`` token counts of every usable pair in ``path``."""
    from megarm.data.handlers import RecordError, get_handler

    handler = get_handler("hh_rlhf")
    opener = gzip.open if path.endswith(".gz") else open
    lengths = []
    with opener(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            try:
                pair = handler.extract(json.loads(line))
            except RecordError:
                continue
            counts = []
            for response in (pair.chosen, pair.rejected):
                messages = pair.prompt + [{"role": "assistant", "content": response}]
                text = tokenizer.apply_chat_template(messages, tokenize=False)
                counts.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
            lengths.append((counts[0], counts[1]))
    return lengths


def padding_stats(
    lengths: list[tuple[int, int]], micro_batch_size: int = 8, seq_length: int = 4096
) -> dict[str, float]:
    """Padded / total tokens without and with packing over whole micro-batches of
    ``micro_batch_size`` pairs (pairs with a sequence over ``seq_length`` are skipped)."""
    pairs = [p for p in lengths if max(p) <= seq_length]
    real = padded_total = packed_total = rows_packed = 0
    batches = len(pairs) // micro_batch_size
    for k in range(batches):
        chunk = pairs[k * micro_batch_size : (k + 1) * micro_batch_size]
        seqs = [c for c, _ in chunk] + [r for _, r in chunk]
        real += sum(seqs)
        padded_total += len(seqs) * max(seqs)
        rows = pack_lengths(seqs, seq_length)
        packed_total += len(rows) * row_width(rows, seqs)
        rows_packed += len(rows)
    return {
        "pairs_read": len(lengths),
        "pairs": batches * micro_batch_size,
        "micro_batches": batches,
        "real_tokens": real,
        "padding_fraction_unpacked": (padded_total - real) / padded_total,
        "padding_fraction_packed": (packed_total - real) / packed_total,
        "tokens_unpacked": padded_total,
        "tokens_packed": packed_total,
        "rows_per_micro_batch_unpacked": 2 * micro_batch_size,
        "rows_per_micro_batch_packed": rows_packed / batches,
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--input",
        default=str(Path(__file__).resolve().parents[2] / "shared/data/hh_rlhf_harmless_1800.jsonl.gz"),
    )
    p.add_argument("--tokenizer-dir", default=None, help="default: build the offline Qwen2.5 one")
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=4096)
    args = p.parse_args(argv)
    from megarm.data.tokenizer import build_qwen25_tokenizer, load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        directory = args.tokenizer_dir or str(build_qwen25_tokenizer(Path(tmp) / "qwen25"))
        tokenizer = load_tokenizer(directory)
        lengths = pair_lengths(args.input, tokenizer)
    stats = padding_stats(lengths, args.micro_batch_size, args.seq_length)
    print(json.dumps(stats, indent=2))
    return stats


if __name__ == "__main__":
    main()
