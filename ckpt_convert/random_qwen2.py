"""Write a random-weight HF Qwen2 checkpoint of any size, one safetensors shard at a time.

For conversion benchmarks and memory tests: a multi-GB input is produced without
ever holding more than one shard. The files are what ``save_pretrained`` writes
(``config.json`` from transformers' ``Qwen2Config``, shards split with
huggingface_hub's helper, ``model.safetensors.index.json`` when there are several),
so the converter reads them exactly like a downloaded checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ckpt_convert.qwen2_mapping import Qwen2Shape, hf_shapes

# Python code importing what the converters import: the memory baseline their
# peak RSS is compared with (tools/benchmark_convert.py and the memory test).
CONVERTER_IMPORTS = (
    "import torch, transformers, safetensors, megatron.core.dist_checkpointing;"
    "import ckpt_convert.hf2mcore, ckpt_convert.mcore2hf, ckpt_convert.torch_dist_stream"
)


def write_random_qwen2(
    path: Path,
    *,
    hidden_size: int,
    num_layers: int,
    ffn_hidden_size: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    vocab_size: int = 151936,
    tie_word_embeddings: bool = False,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str = "1GB",
    seed: int = 0,
) -> dict[str, Any]:
    """A ``Qwen2ForCausalLM`` with N(0, 0.02) weights (norms 1) in ``path``; returns
    ``{"total_bytes", "largest_shard_bytes", "largest_tensor_bytes", "files"}``."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from transformers import Qwen2Config

    path.mkdir(parents=True, exist_ok=True)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=ffn_hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        tie_word_embeddings=tie_word_embeddings,
        architectures=["Qwen2ForCausalLM"],
    )
    config.save_pretrained(str(path))
    shape = Qwen2Shape(
        num_layers=num_layers,
        hidden_size=hidden_size,
        ffn_hidden_size=ffn_hidden_size,
        num_attention_heads=num_attention_heads,
        num_query_groups=num_key_value_heads,
        head_dim=hidden_size // num_attention_heads,
        vocab_size=vocab_size,
        padded_vocab_size=vocab_size,
    )
    shapes = hf_shapes(shape, with_score=False)
    if not tie_word_embeddings:
        shapes["lm_head.weight"] = (vocab_size, hidden_size)
    planned = {name: torch.empty(size, dtype=dtype, device="meta") for name, size in shapes.items()}
    split = split_torch_state_dict_into_shards(planned, max_shard_size=max_shard_size)
    generator = torch.Generator().manual_seed(seed)
    largest_shard = 0
    for filename, names in split.filename_to_tensors.items():
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=dtype)
            else:
                values = torch.randn(shapes[name], generator=generator) * 0.02
                tensors[name] = values.to(dtype)
        save_file(tensors, str(path / filename), metadata={"format": "pt"})
        largest_shard = max(largest_shard, sum(t.nbytes for t in tensors.values()))
        del tensors
    if split.is_sharded:
        index = {"metadata": dict(split.metadata), "weight_map": split.tensor_to_filename}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return {
        "total_bytes": int(split.metadata["total_size"]),
        "largest_shard_bytes": largest_shard,
        "largest_tensor_bytes": max(t.nbytes for t in planned.values()),
        "files": len(split.filename_to_tensors),
    }
