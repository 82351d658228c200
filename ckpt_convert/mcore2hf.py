"""Export a megarm checkpoint as an HF ``*ForSequenceClassification`` of its family.

    python ckpt_convert/mcore2hf.py --load-dir MCORE_DIR --save-dir HF_DIR \\
        [--iteration N] [--tokenizer-model DIR] [--max-shard-size 5GB] [--pad-token TEXT]

What is written, and how: :mod:`ckpt_convert.export_hf`. This module only parses the
command line: torch, megatron-core and transformers are imported after it, so
``--help`` and a usage error answer at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

# megarm.platform.DTYPES' names (a test checks they agree), without importing torch.
DTYPES = ("bf16", "fp16", "fp32")


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="mcore2hf.py",
        description="Export a megarm checkpoint as an HF *ForSequenceClassification of its "
        "family (Qwen2, Qwen3, Llama).",
    )
    p.add_argument("--load-dir", required=True, help="megarm checkpoint (save root or iter dir)")
    p.add_argument("--save-dir", required=True, help="output HF directory (must not exist)")
    p.add_argument("--iteration", type=int, default=None, help="iteration (default: latest)")
    p.add_argument("--tokenizer-model", help="tokenizer directory to copy (default: MCORE_DIR's)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (5GB)")
    p.add_argument(
        "--params-dtype",
        choices=("auto", *DTYPES),
        default="auto",
        help="dtype of the exported weights (auto: as stored in the checkpoint)",
    )
    p.add_argument(
        "--pad-token",
        help="token the export pads with (default: the tokenizer's, unless it ends rewarded "
        "sequences, e.g. Llama 3's <|eot_id|>; then <|finetune_right_pad_id|> or a reserved token)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --save-dir")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a bad input)."""
    build_parser().parse_args(argv)  # --help and usage errors before the heavy imports
    from ckpt_convert import export_hf

    return export_hf.main(argv)


def __getattr__(name: str) -> Any:
    # The export's functions, as they were importable from here.
    from ckpt_convert import export_hf

    return getattr(export_hf, name)


if __name__ == "__main__":
    # dist_checkpointing starts worker processes: nothing may run on import.
    sys.exit(main())
