#!/usr/bin/env python
"""Tokenize preference pairs into megatron-core indexed datasets.

    python tools/preprocess_data.py --input data.jsonl --output-prefix out/hh \\
        --tokenizer-name-or-path Qwen2.5-7B-Instruct --handler-name hh_rlhf --workers 8
    python tools/preprocess_data.py --config configs/datasets/hh_rlhf.yaml

See ``python tools/preprocess_data.py --help`` and :mod:`megarm.data.preprocess`.
"""

import sys

from megarm.data.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
