"""Time megarm's reward encoder on very long prompts, with and without the byte bound
it applies before tokenising (megarm.rewards.encoding: a text that cannot fit
``seq_length`` is cut in bytes first):

    python tools/benchmark_long_prompts.py [--mb 1.93] [--prompts 4] [--seq-lengths 2048 4096]

Uses the offline Qwen2.5-compatible tokenizer; prints one line per case and whether
the rows are the same length either way.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=1.93, help="megabytes per prompt")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--seq-lengths", type=int, nargs="+", default=[2048, 4096])
    args = parser.parse_args(argv)

    from megarm.data.tokenizer import build_qwen25_tokenizer
    from megarm.rewards.encoding import build_encoder

    tokenizer = build_qwen25_tokenizer(Path(tempfile.mkdtemp()))
    sentence = "the cat sat on the mat and looked at the door "
    words = sentence * int(args.mb * 1e6 / len(sentence))
    conversation = [{"role": "user", "content": words}, {"role": "assistant", "content": "Ok."}]
    for seq in args.seq_lengths:
        lengths = {}
        for bounded in (False, True):
            encoder = build_encoder(str(tokenizer), seq_length=seq)
            if not bounded:
                encoder.text_bytes = None  # the whole text tokenised, then cut
            start = time.perf_counter()
            rows = [encoder.conversation(conversation) for _ in range(args.prompts)]
            seconds = time.perf_counter() - start
            lengths[bounded] = len(rows[0])
            print(f"seq_length {seq} {'bounded' if bounded else 'whole text'}: {args.prompts} prompts of "
                  f"{len(words) / 1e6:.2f} MB in {seconds:.2f} s, rows of {len(rows[0])} tokens", flush=True)
        print(f"seq_length {seq}: rows equal in length: {lengths[False] == lengths[True]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
