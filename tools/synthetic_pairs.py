"""Write synthetic preference pairs as JSON lines, offline:
``python tools/synthetic_pairs.py --output pairs.jsonl [--count 2000] [--seed 1]``

Each line is ``{"prompt", "chosen", "rejected"}``: the chosen answer a well-formed
sentence, the rejected one the same words shuffled (the demo's pairs,
:func:`megarm.demo_common.write_pairs`). For trying the real path without a dataset; read
them with ``tools/preprocess_data.py --handler-name pairwise_messages``. Distinct
seeds give disjoint streams (e.g. training and held-out files).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0].rstrip(":"))
    parser.add_argument("--output", required=True, help="jsonl file to write")
    parser.add_argument("--count", type=int, default=2000, help="number of pairs (2000)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (1)")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be >= 1")
    from megarm.demo_common import write_pairs

    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    write_pairs(tmp, args.count, args.seed)
    os.replace(tmp, out)
    print(f"wrote {args.count} pairs to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
