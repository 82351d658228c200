"""Write a random-weight HF Qwen2 checkpoint of any size, one safetensors shard at a time.

    python ckpt_convert/random_qwen2.py --shape qwen2.5-0.5b --save-dir work/hf_0.5b
    python ckpt_convert/random_qwen2.py --config configs/orm_trainer_tiny.yaml \
        --save-dir work/hf_tiny --no-tokenizer

To try the real path without downloading anything (README, "Try the real path on a
laptop"), and for conversion benchmarks and memory tests: a multi-GB input is
produced without ever holding more than one shard. ``--shape qwen2.5-<size>`` takes
every shape key (layers, widths, heads, vocabulary, ``rope_theta``, ``rms_norm_eps``,
``max_position_embeddings``, tied embeddings) from the shipped
``configs/orm_trainer_qwen25_<size>.yaml``; ``--config`` from any megarm config. The
offline Qwen2.5 tokenizer (:func:`megarm.data.tokenizer.build_qwen25_tokenizer`) is
written beside the weights. The files are what ``save_pretrained`` writes
(``config.json`` from transformers' Qwen2 config, its keys written by the qwen2
family's table; shards split with huggingface_hub's helper,
``model.safetensors.index.json`` when there are several), so the converter reads
them exactly like a downloaded checkpoint. Everything is written under a temporary
name and renamed when complete (:func:`ckpt_convert.cli.staged_output`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from transformers import AutoConfig

from ckpt_convert import cli
from megarm import platform
from megarm.config import ConfigError, ModelConfig, load_config
from megarm.data.tokenizer import build_qwen25_tokenizer
from megarm.families import Shape
from megarm.families.qwen2 import QWEN2

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("random_qwen2")
# The offline Qwen2.5 tokenizer's size (151643 BPE ranks + 22 added tokens).
QWEN25_TOKENIZER_SIZE = 151665
QWEN25_BOS_ID, QWEN25_EOS_ID = 151643, 151645

# Python code importing what the converters import: the memory baseline their
# peak RSS is compared with (tools/benchmark_convert.py and the memory test).
CONVERTER_IMPORTS = (
    "import torch, transformers, safetensors, megatron.core.dist_checkpointing;"
    "import ckpt_convert.hf2mcore, ckpt_convert.mcore2hf, megarm.checkpoint.stream"
)


def write_random_qwen2(
    path: Path,
    *,
    hidden_size: int,
    num_layers: int,
    ffn_hidden_size: int,
    num_attention_heads: int,
    num_query_groups: int,
    vocab_size: int = 151936,
    tie_word_embeddings: bool = False,
    rotary_base: float = 1000000.0,
    norm_epsilon: float = 1e-6,
    max_position_embeddings: int = 32768,
    kv_channels: int | None = None,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str = "1GB",
    seed: int = 0,
) -> dict[str, Any]:
    """A Qwen2 ``*ForCausalLM`` with N(0, 0.02) weights (norms 1) in ``path``, the shape
    given in megarm's ``model.*`` names; returns ``{"total_bytes",
    "largest_shard_bytes", "largest_tensor_bytes", "files"}``. The defaults of
    ``rotary_base``, ``norm_epsilon`` and ``max_position_embeddings`` are Qwen2.5's
    (transformers' own Qwen2 defaults differ)."""
    model = ModelConfig(
        family="qwen2",
        num_layers=num_layers,
        hidden_size=hidden_size,
        ffn_hidden_size=ffn_hidden_size,
        num_attention_heads=num_attention_heads,
        num_query_groups=num_query_groups,
        kv_channels=kv_channels,
        vocab_size=vocab_size,
        make_vocab_size_divisible_by=1,
        max_position_embeddings=max_position_embeddings,
        rotary_base=rotary_base,
        norm_epsilon=norm_epsilon,
        tie_word_embeddings=tie_word_embeddings,
    )
    path.mkdir(parents=True, exist_ok=True)
    keys = QWEN2.write(model)
    extra: dict[str, Any] = {}
    if vocab_size > QWEN25_EOS_ID:  # Qwen2.5's special ids exist in this vocabulary
        extra.update(bos_token_id=QWEN25_BOS_ID, eos_token_id=QWEN25_EOS_ID)
    config = AutoConfig.for_model(
        keys.pop("model_type"), architectures=[QWEN2.causal_lm], **keys, **extra
    )
    config.dtype = str(dtype).removeprefix("torch.")  # what the shards hold
    config.save_pretrained(str(path))
    shapes = QWEN2.hf_shapes(Shape.of(model))
    if not tie_word_embeddings:
        (lm_head,) = QWEN2.dropped  # the LM head a CausalLM has when it is not tied
        shapes[lm_head] = (vocab_size, hidden_size)
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


# --------------------------------------------------------------------------- command line


def shipped_shapes() -> dict[str, Path]:
    """``qwen2.5-<size>`` -> the shipped config holding that shape."""
    return {
        "qwen2.5-" + path.stem.rsplit("_", 1)[1]: path
        for path in sorted((ROOT / "configs").glob("orm_trainer_qwen25_*.yaml"))
    }


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    shapes = shipped_shapes()
    p = argparse.ArgumentParser(
        prog="random_qwen2.py",
        description="Write a random-weight HF Qwen2ForCausalLM (and the offline Qwen2.5 "
        "tokenizer) with the shape of a shipped or given megarm config.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--shape", choices=tuple(shapes), help="a shipped Qwen2.5 shape")
    source.add_argument("--config", help="take the shape from this megarm YAML config")
    p.add_argument("--save-dir", required=True, help="output HF directory (must not exist)")
    p.add_argument(
        "--dtype", choices=tuple(platform.DTYPES), default="fp32",
        help="dtype of the weights (default fp32; the CPU trains in fp32)",
    )
    p.add_argument("--max-shard-size", default="1GB", help="largest safetensors file (1GB)")
    p.add_argument("--seed", type=int, default=0, help="seed of the N(0, 0.02) weights")
    p.add_argument(
        "--no-tokenizer", action="store_true",
        help="do not write the offline Qwen2.5 tokenizer beside the weights",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --save-dir")
    return p


class RandomCheckpointError(ValueError):
    """A bad command line (shape, tokenizer, output directory)."""


def write(args: argparse.Namespace) -> dict[str, Any]:
    """Run what ``args`` describe; returns :func:`write_random_qwen2`'s summary."""
    config = Path(args.config) if args.config else shipped_shapes()[args.shape]
    try:
        m = load_config(config).model
    except ConfigError as exc:
        raise RandomCheckpointError(str(exc)) from exc
    if m.family != "qwen2":
        raise RandomCheckpointError(f"{config}: model.family is {m.family}; this writes Qwen2 models")
    if not args.no_tokenizer and m.vocab_size < QWEN25_TOKENIZER_SIZE:
        raise RandomCheckpointError(
            f"{config}: vocab_size {m.vocab_size} is smaller than the Qwen2.5 tokenizer's "
            f"{QWEN25_TOKENIZER_SIZE} tokens; pass --no-tokenizer"
        )
    save = Path(args.save_dir)
    if save.exists() and not args.overwrite:
        raise RandomCheckpointError(f"--save-dir {save} exists; remove it or pass --overwrite")
    with cli.staged_output(save) as tmp:
        info = write_random_qwen2(
            tmp,
            hidden_size=m.hidden_size,
            num_layers=m.num_layers,
            ffn_hidden_size=m.ffn_hidden_size,
            num_attention_heads=m.num_attention_heads,
            num_query_groups=m.num_query_groups,
            vocab_size=m.vocab_size,
            tie_word_embeddings=m.tie_word_embeddings,
            rotary_base=m.rotary_base,
            norm_epsilon=m.norm_epsilon,
            max_position_embeddings=m.max_position_embeddings,
            kv_channels=m.kv_channels,
            dtype=platform.DTYPES[args.dtype],
            max_shard_size=args.max_shard_size,
            seed=args.seed,
        )
        if not args.no_tokenizer:
            build_qwen25_tokenizer(tmp)
    log.info(
        "wrote %s: %.2f GB of random %s weights in %d file(s), shape of %s%s",
        save, info["total_bytes"] / 1e9, args.dtype, info["files"], config,
        "" if args.no_tokenizer else ", with the offline Qwen2.5 tokenizer",
    )
    return info


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a bad command line)."""
    return cli.run(log, build_parser(), write, (RandomCheckpointError,), argv)


if __name__ == "__main__":
    sys.exit(main())
