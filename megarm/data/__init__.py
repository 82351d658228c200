"""Preference-pair data: raw records -> indexed datasets -> micro-batches.

- :mod:`megarm.data.handlers`: raw record -> prompt messages, chosen, rejected, margin
- :mod:`megarm.data.templates`: chat formatting (the tokenizer's template or a named one)
- :mod:`megarm.data.readers`: streaming jsonl/json/parquet/csv/arrow input
- :mod:`megarm.data.preprocess`: the ``tools/preprocess_data.py`` pipeline
- :mod:`megarm.data.tokenizer`: tokenizer loading, vocab fingerprint, offline Qwen2.5 tokenizer
- :mod:`megarm.data.dataset`: the training dataset, splits, blends, collate and DP sampler

Importing this package does not import torch or megatron-core.
"""

from megarm.data.dataset import validate_data_path
from megarm.data.handlers import HANDLERS, get_handler

__all__ = ["HANDLERS", "get_handler", "validate_data_path"]
