"""Convert a Hugging Face checkpoint of a megarm family (Qwen2 / Qwen2.5, Qwen3
dense, Llama 3.x, Qwen3-MoE, Qwen2-MoE: :mod:`megarm.families`) into a megarm
(megatron-core) one; every routed expert's gate/up/down weights are one tensor each
of the table (``{e}``), streamed one at a time.

    python ckpt_convert/hf2mcore.py --load-dir HF_DIR --save-dir MCORE_DIR \\
        [--target-tensor-parallel-size T] [--target-pipeline-parallel-size P] \\
        [--format torch_dist|legacy] [--params-dtype bf16|fp16|fp32] [--tokenizer-model DIR]

Input: the family's ``*ForCausalLM`` (the LM head is dropped and a fresh value head
is drawn from N(0, 1/(hidden+1)), as megarm's model does) or its
``*ForSequenceClassification`` with ``num_labels=1`` (its score head becomes the value
head unchanged). ``--keep-lm-head`` keeps a ``*ForCausalLM``'s LM head as megarm's
output layer, for critique models (``training.objective: sft | joint``; a model with
tied embeddings needs no tensor of its own); the checkpoint then holds both heads. Weights
may be sharded safetensors (``model.safetensors.index.json``), one
``model.safetensors``, or ``pytorch_model.bin`` (optionally indexed); tied embeddings
(no ``lm_head.weight``) are fine. Tensors are read one at a time, file by file.

Everything that can be checked from ``config.json`` is checked before any weight
file is opened: the family and architecture, what megarm cannot represent
(DeepSeek-style experts and latent attention, dense layers among expert layers,
sliding windows, RoPE scaling other than Llama 3's: refused by name), ``num_labels``,
and the target layout (the config validator's rules: TP divides the KV and attention
heads, PP the layers; the error lists the sizes allowed).

The vocabulary is padded to a multiple of ``--make-vocab-size-divisible-by`` (128,
megarm's ``model.make_vocab_size_divisible_by``) with zero rows. The padding does
*not* depend on the tensor-parallel size, so one checkpoint serves every layout.

Output formats:

``torch_dist`` (default)
    megatron-core ``dist_checkpointing``: ``<save>/iter_0000000/`` plus
    ``latest_checkpointed_iteration.txt``; megarm loads it at any TP/PP
    (``checkpoint.load=MCORE_DIR``). The target TP/PP are only validated.
``legacy``
    ``<save>/iter_0000000/mp_rank_XX[_YYY]/model_optim_rng.pt`` for exactly the
    target TP/PP (Megatron-LM's layout; ``_YYY`` only when PP > 1).

Next to the weights the save directory gets the HF ``config.json`` (so
``model.hf_config=MCORE_DIR`` gives megarm the shape), the tokenizer files (from
``--tokenizer-model``, else from HF_DIR) and ``megarm_model.json`` describing the
conversion. Everything is written to a temporary directory beside MCORE_DIR and
renamed into place only when complete (:func:`ckpt_convert.cli.staged_output`).

Memory: weights stream from disk one model tensor (one q/k/v or gate/up group) at a
time, one weight file open (memory-mapped) at a time. ``torch_dist`` never builds the
model: the model exists on the meta device only, and each tensor is read,
transformed, written to the checkpoint and freed before the next
(:mod:`megarm.checkpoint.stream`), so the peak is about the largest HF shard
plus one layer. ``legacy`` holds one rank's ``model_optim_rng.pt`` (the model / (TP x
PP)) plus one full tensor.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

import megarm.model  # noqa: F401  (first: quiets megatron-core's import-time warnings about absent kernels)
from ckpt_convert import cli
from ckpt_convert.hf_reader import ConversionError, HFCheckpoint
from ckpt_convert.mapping import MappingError, hf_to_mcore, value_head_name
from megarm import distributed, families, platform
from megarm.checkpoint import iteration_dir, write_tracker
from megarm.checkpoint.metadata import CONVENTION_KEY, write_checkpoint_stats
from megarm.checkpoint.stream import save_streaming
from megarm.config import (
    ConfigError,
    MegarmConfig,
    ParallelConfig,
    layout_issues,
    load_config,
    read_hf_config,
    to_dict,
)
from megarm.families import Entry, Family, FamilyError, Shape
from megarm.model.builder import meta_sharded_state_dict, params_dtype
from megarm.model.reward_model import init_value_head
from megarm.model.sharding import chunk_layers, shard_state_dict

log = logging.getLogger("hf2mcore")

ITERATION = 0


# --------------------------------------------------------------------------- config


def hf_config_of(load_dir: Path) -> dict[str, Any]:
    """The HF ``config.json`` of ``load_dir`` as a dict."""
    try:
        return read_hf_config(str(load_dir))
    except ConfigError as exc:
        raise ConversionError(f"--load-dir {load_dir}: {exc.issues[0].message}") from exc


def stored_dtype(load_dir: Path, hf: dict[str, Any]) -> str | None:
    """``fp32``/``bf16``/``fp16`` of the weights: config.json's ``dtype`` (``torch_dtype``
    before transformers 5), else the first safetensors header; ``None`` when unknown."""
    named = hf.get("dtype") or hf.get("torch_dtype")
    if isinstance(named, str) and platform.dtype_name(named):
        return platform.dtype_name(named)
    files = sorted(load_dir.glob("*.safetensors"))
    if not files:
        return None
    try:
        with safe_open(str(files[0]), framework="pt") as handle:
            names = list(handle.keys())
            return platform.dtype_name(handle.get_slice(names[0]).get_dtype()) if names else None
    except Exception:  # an unreadable file is reported where the weights are read
        return None


def num_labels(hf: dict[str, Any]) -> int:
    """HF's ``num_labels``: explicit, else the size of ``id2label``, else its default 2."""
    if hf.get("num_labels") is not None:
        return int(hf["num_labels"])
    if hf.get("id2label"):
        return len(hf["id2label"])
    return 2


def architecture(hf: dict[str, Any], family: Family, config_path: Path) -> str | None:
    """The family's ``*ForCausalLM`` or ``*ForSequenceClassification`` (num_labels=1)
    that config.json names; ``None`` when it names no architecture."""
    archs = hf.get("architectures") or []
    if not archs:
        return None
    arch = archs[0]
    if arch == family.sequence_classification and (labels := num_labels(hf)) != 1:
        raise ConversionError(
            f"{config_path}: {arch} with num_labels={labels}; megarm's value head is a "
            f"single scalar (num_labels=1). Convert the base {family.causal_lm} instead"
        )
    return arch  # families.detect accepted it


def build_config(
    config_path: Path, params_dtype: str, divisible_by: int, seed: int
) -> MegarmConfig:
    """megarm's config (TP=1, PP=1) for the model config.json describes, read by the
    config validator's own HF reader (the family's table): a model megarm cannot
    represent is refused there, by name."""
    overrides = [
        f"model.hf_config={config_path}",
        f"model.make_vocab_size_divisible_by={divisible_by}",
        f"model.params_dtype={params_dtype}",
        f"training.seed={seed}",
    ]
    try:
        cfg = load_config(None, overrides)
    except ConfigError as exc:
        raise ConversionError(_one_line(exc)) from exc
    cfg.model.hf_config = None  # the shape is resolved; the source dir may move
    return cfg


def _one_line(exc: ConfigError) -> str:
    return "; ".join(
        issue.message if issue.key == "model.hf_config" else str(issue) for issue in exc.issues
    )


# What the converter's command line calls the config keys of a layout problem.
_LAYOUT_FLAGS = {
    "parallel.tensor_model_parallel_size": "tensor-parallel size {tp} (--target-tensor-parallel-size)",
    "parallel.pipeline_model_parallel_size": "pipeline-parallel size {pp} (--target-pipeline-parallel-size)",
    "model.make_vocab_size_divisible_by": "--make-vocab-size-divisible-by {div}",
}


def layout_problems(cfg: MegarmConfig, tp: int, pp: int, config_path: Path) -> list[str]:
    """Why TP x PP cannot hold the model (the config validator's rules), in the
    converter's terms; empty when it can."""
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    div = cfg.model.make_vocab_size_divisible_by
    return [
        f"{_LAYOUT_FLAGS.get(issue.key, str(config_path)).format(tp=tp, pp=pp, div=div)}: "
        f"{issue.message}"
        for issue in layout_issues(cfg.model, parallel)
    ]


# --------------------------------------------------------------------------- writers


def _ordered(selected: list[Entry], ckpt: HFCheckpoint) -> list[Entry]:
    """Entries sorted by the weight file of their first tensor, so files are read one
    after another (stable: model order within a file)."""
    order = {file: i for i, file in enumerate(ckpt.files)}
    return sorted(selected, key=lambda e: order.get(ckpt.file_of(e.hf[0]), 0))


def write_torch_dist(
    ckpt: HFCheckpoint, cfg: MegarmConfig, selected: list[Entry], with_score: bool, out: Path,
    hf: dict[str, Any],
) -> None:
    """Stream the HF tensors into a torch_dist checkpoint, one model tensor at a time.

    The model exists only on the meta device (for megatron-core's checkpoint keys,
    shapes and chunk layout); each tensor is read from the HF files, transformed,
    written and freed before the next (see :mod:`megarm.checkpoint.stream`).
    """
    shape = Shape.of(cfg.model)
    head_name = value_head_name(families.family(cfg.model.family))
    # One process of its own: a converter started by torchrun must still be TP=PP=1.
    # (a world of one opens no TCP store: megarm.distributed uses an in-memory one)
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    distributed.init(1, 1, seed=cfg.training.seed)
    try:
        sharded = meta_sharded_state_dict(cfg)
        dtype = params_dtype(cfg)
        by_name = {e.mcore: e for e in selected}
        # Tensors in the order their HF files hold them: one weight file open at a time.
        order = [e.mcore for e in _ordered(selected, ckpt)]
        if not with_score:
            order.append(head_name)

        # A refusal raised while DCP writes (a tensor of the wrong shape) reaches us
        # wrapped in DCP's CheckpointException, a page of traceback: keep it to
        # raise as itself.
        refused: list[Exception] = []

        def produce(name: str) -> torch.Tensor:
            if name == head_name and not with_score:
                return fresh_value_head(shape.hidden_size, cfg.training.seed, dtype)
            try:
                ((_, tensor),) = hf_to_mcore(ckpt.read, shape, [by_name[name]], dtype, ckpt.where)
            except (ConversionError, MappingError) as exc:
                refused.append(exc)
                raise
            return tensor

        common = {
            "iteration": ITERATION,
            "consumed_samples": 0,
            "megarm_config": to_dict(cfg),
            "hf_config": hf,
            "checkpoint_layout": [1, 1, 1],  # (PP, TP, DP) it was written at
        }
        convention, stats = reward_record(hf) if with_score else (None, None)
        if convention is not None:
            common[CONVENTION_KEY] = convention
        final = iteration_dir(out, ITERATION)
        final.mkdir(parents=True)
        try:
            written = save_streaming(final, sharded, produce, order, common)
        except BaseException:  # DCP's CheckpointException is a BaseException
            if refused:
                raise refused[0] from None
            raise
        if stats is not None:
            write_checkpoint_stats(final, stats)
        ckpt.close()
        write_tracker(out, ITERATION)
        log.info("streamed %.2f GB of %s weights", written / 1e9, str(dtype).removeprefix("torch."))
    finally:
        distributed.teardown()


def reward_record(hf: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """``(reward convention, {mean, std})`` a reward model's config.json records (a
    megarm export writes both; OpenRLHF's reward models have mean/std): kept with its
    score head, so the converted checkpoint, training from it and its export read and
    normalise the reward as the source did."""
    convention = hf.get(CONVENTION_KEY)
    convention = convention if isinstance(convention, dict) else None
    mean, std = hf.get("mean"), hf.get("std")
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (mean, std))
    return convention, ({"mean": float(mean), "std": float(std)} if ok else None)


def fresh_value_head(hidden_size: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """The value head megarm's model would initialise: N(0, 1/(hidden+1)), seeded."""
    weight = torch.empty(1, hidden_size)
    init_value_head(weight, hidden_size, seed)
    return weight.to(dtype)


def legacy_rank_dir(tp_rank: int, pp_rank: int, pp_size: int) -> str:
    """Megatron-LM's per-rank directory name (``_YYY`` only with pipeline parallelism)."""
    return f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp_size > 1 else "")


def write_legacy(
    ckpt: HFCheckpoint,
    cfg: MegarmConfig,
    all_entries: list[Entry],
    with_score: bool,
    out: Path,
    tp: int,
    pp: int,
) -> None:
    """``mp_rank_XX[_YYY]/model_optim_rng.pt`` for exactly TP x PP, one rank file at a
    time: each full tensor is read, cut to the rank's slice and freed, so memory holds
    one rank's file plus one full tensor (the stage's HF tensors are read TP times)."""
    shape = Shape.of(cfg.model)
    head_name = value_head_name(families.family(cfg.model.family))
    dtype = params_dtype(cfg)
    saved_cfg = to_dict(cfg)
    saved_cfg["parallel"].update(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    root = iteration_dir(out, ITERATION)
    for pp_rank in range(pp):
        layers = chunk_layers(shape.num_layers, pp_rank, pp)
        first, last = pp_rank == 0, pp_rank == pp - 1
        selected = _ordered(
            [
                e
                for e in all_entries
                if (e.part == "embedding" and first)
                or (e.part == "final" and last)
                or (e.layer is not None and e.layer in layers)
            ],
            ckpt,
        )
        for tp_rank in range(tp):
            shard: dict[str, torch.Tensor] = {}
            stream = hf_to_mcore(ckpt.read, shape, selected, dtype, ckpt.where)
            if last and not with_score:
                head = fresh_value_head(shape.hidden_size, cfg.training.seed, dtype)
                stream = itertools.chain(stream, [(head_name, head)])
            for name, full in stream:
                shard.update(
                    shard_state_dict({name: full}, shape.num_layers, tp_rank, tp, pp_rank, pp)
                )
                del full
            rank_dir = root / legacy_rank_dir(tp_rank, pp_rank, pp)
            rank_dir.mkdir(parents=True)
            torch.save(
                {
                    "model": shard,
                    "checkpoint_version": 3.0,
                    "iteration": ITERATION,
                    "megarm_config": saved_cfg,
                },
                rank_dir / "model_optim_rng.pt",
            )
            del shard
            log.info("wrote %s", rank_dir.relative_to(out))
    ckpt.close()
    write_tracker(out, ITERATION)


def copy_side_files(
    out: Path, load_dir: Path, tokenizer_dir: Path | None, info: dict[str, Any]
) -> list[str]:
    """config.json (megarm reads RoPE settings in either transformers' layout), the
    tokenizer files and megarm_model.json (``info``, completed with the tokenizer
    files copied) into ``out``; returns the tokenizer files copied."""
    shutil.copy2(load_dir / "config.json", out / "config.json")
    copied = cli.copy_tokenizer(tokenizer_dir or load_dir, out)
    info["tokenizer_files"] = copied
    (out / "megarm_model.json").write_text(json.dumps(info, indent=2) + "\n")
    return copied


# --------------------------------------------------------------------------- driver


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="hf2mcore.py",
        description="Convert an HF checkpoint (Qwen2/Qwen2.5, Qwen3, Llama 3.x) into a megarm "
        "reward-model checkpoint.",
    )
    p.add_argument("--load-dir", required=True, help="HF model directory (config.json + weights)")
    p.add_argument("--save-dir", required=True, help="output directory (must not exist)")
    p.add_argument("--target-tensor-parallel-size", type=int, default=1, help="TP (default 1)")
    p.add_argument("--target-pipeline-parallel-size", type=int, default=1, help="PP (default 1)")
    p.add_argument(
        "--format",
        choices=("torch_dist", "legacy"),
        default="torch_dist",
        help="torch_dist: loadable at any TP/PP (default); legacy: mp_rank_XX for TP x PP",
    )
    p.add_argument(
        "--params-dtype",
        choices=tuple(platform.DTYPES),
        default="bf16",
        help="dtype of the saved weights (default bf16)",
    )
    p.add_argument("--tokenizer-model", help="tokenizer directory to copy (default: --load-dir's)")
    p.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        default=128,
        help="pad the vocabulary to a multiple of this (default 128; independent of TP)",
    )
    p.add_argument(
        "--spec",
        choices=("local", "te"),
        default="local",
        help="legacy format only: layer-norm names of megatron's local or TE layer spec "
        "(torch_dist keys do not depend on the spec)",
    )
    p.add_argument("--seed", type=int, default=1234, help="seed of a freshly drawn value head")
    p.add_argument(
        "--keep-lm-head",
        action="store_true",
        help="keep the *ForCausalLM's LM head (or the tied embedding) as the output layer of "
        "a critique model (training.objective sft or joint); torch_dist only",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --save-dir")
    return p


def _report_dtype(load: Path, stored: str | None, wanted: str) -> None:
    """The first line of the output: a narrower dtype loses bits for good."""
    if stored is None or stored == wanted:
        return
    rounding = platform.DTYPES[wanted].itemsize < platform.DTYPES[stored].itemsize
    log.info(
        "%s the %s weights of %s to %s (--params-dtype %s%s)",
        "rounding" if rounding else "converting", stored, load, wanted, wanted,
        ", the default, what GPUs train in; pass --params-dtype fp32 to keep every bit, "
        "e.g. for fp32 training on CPU" if rounding and wanted == "bf16" else "",
    )


def _check_config(
    args: argparse.Namespace, load: Path, hf: dict[str, Any]
) -> tuple[Family, str | None, MegarmConfig, Path | None]:
    """Everything config.json and the options can tell, before any weight file is
    opened: the family, the architecture, megarm's config, the tokenizer to copy."""
    config_path = load / "config.json"
    tp, pp = args.target_tensor_parallel_size, args.target_pipeline_parallel_size
    try:
        family = families.detect(hf, str(config_path))
    except FamilyError as exc:
        raise ConversionError(str(exc)) from exc
    arch = architecture(hf, family, config_path)
    cfg = build_config(config_path, args.params_dtype, args.make_vocab_size_divisible_by, args.seed)
    if problems := layout_problems(cfg, tp, pp, config_path):
        raise ConversionError("; ".join(problems))
    save = Path(args.save_dir)
    if save.exists() and not args.overwrite:
        raise ConversionError(f"--save-dir {save} exists; remove it or pass --overwrite")
    tokenizer_dir = Path(args.tokenizer_model) if args.tokenizer_model else None
    if tokenizer_dir is not None and not cli.has_tokenizer(tokenizer_dir):
        raise ConversionError(
            f"--tokenizer-model {tokenizer_dir} holds none of "
            f"{', '.join(cli.TOKENIZER_FILES[:3])}; "
            "pass a Hugging Face tokenizer directory"
        )
    if tokenizer_dir is not None and (
        problem := cli.tokenizer_problem(tokenizer_dir, cfg.model.vocab_size, load)
    ):
        raise ConversionError(problem)
    return family, arch, cfg, tokenizer_dir


def _select_weights(
    args: argparse.Namespace, load: Path, ckpt: HFCheckpoint, family: Family, arch: str | None,
    cfg: MegarmConfig,
) -> tuple[str, bool, list[Entry]]:
    """The architecture (from the weights when config.json names none), whether the
    input has a score head, and the table entries to convert; every tensor of the
    input is converted, dropped by the table on purpose, or an error."""
    names = ckpt.names()
    num_layers = cfg.model.num_layers
    experts = Shape.of(cfg.model).routed_experts
    if arch is None:
        scored = set(family.entries(num_layers, ("value",), experts=experts)) - set(
            family.entries(num_layers, experts=experts)
        )
        has_head = all(name in names for e in scored for name in e.hf)
        arch = family.sequence_classification if has_head else family.causal_lm
        log.info("config.json names no architecture; the weights look like %s", arch)
    with_score = arch == family.sequence_classification
    heads: tuple[str, ...] = ("value",) if with_score else ()
    if args.keep_lm_head:
        if with_score or args.format != "torch_dist":
            raise ConversionError(
                f"--keep-lm-head needs a {family.causal_lm} input and --format torch_dist "
                f"(got {arch}, {args.format})"
            )
        # Both heads in the checkpoint (the meta model builds what the objective needs).
        cfg.training.objective = "joint"
        if not cfg.model.tie_word_embeddings:
            heads = ("lm",)
    selected = family.entries(num_layers, heads, experts=experts)
    wanted = {name for e in selected for name in e.hf}
    missing = sorted(wanted - set(names))
    if missing:
        raise ConversionError(
            f"{load} lacks {len(missing)} tensor(s) a {arch} with {num_layers} layers has, "
            f"e.g. {missing[0]}; the weights and config.json disagree"
        )
    extra = sorted(n for n in names if n not in wanted and not family.is_dropped(n))
    if extra:
        raise ConversionError(
            f"{load} has tensor(s) megarm's {family.name} table does not know, e.g. {extra[0]} "
            f"({len(extra)} in all); is this really a {arch}?"
        )
    dropped = [n for n in names if family.is_dropped(n)]
    if args.keep_lm_head and cfg.model.tie_word_embeddings:
        _check_tied_head(ckpt, family)
    if args.keep_lm_head:
        log.info("keeping the LM head as the output layer (%s)", _output_layer(family, cfg))
    elif dropped:
        log.info("dropping %s (a reward model has no LM head)", ", ".join(dropped))
    elif arch == family.causal_lm:
        log.info(
            "no LM head tensor (tied embeddings: %s): nothing to drop",
            cfg.model.tie_word_embeddings,
        )
    return arch, with_score, selected


def _check_tied_head(ckpt: HFCheckpoint, family: Family) -> None:
    """With tied embeddings the kept LM head is the embedding: an ``lm_head.weight`` of
    the input's own that differs from it would be dropped, and the model changed,
    without a word (issue #25); refuse it by name."""
    head = family.head_rule("lm").hf[0]
    ((embedding,),) = [rule.hf for rule in family.weights if rule.part == "embedding"]
    if head not in ckpt.names():
        return
    if torch.equal(ckpt.read(head), ckpt.read(embedding)):
        return  # some tools save the tied copy too: nothing is lost
    raise ConversionError(
        f"config.json sets tie_word_embeddings: true, but {ckpt.where(head)} holds its own "
        f"{head}, different from {embedding}; --keep-lm-head would keep the embedding as the "
        f"LM head and drop {head}. Set tie_word_embeddings: false in config.json to keep "
        f"{head}, or remove {head} from the weights to keep the tied embedding"
    )


def _output_layer(family: Family, cfg: MegarmConfig) -> str:
    return "tied embedding" if cfg.model.tie_word_embeddings else family.head_rule("lm").hf[0]


def convert(args: argparse.Namespace) -> dict[str, Any]:
    """Run the conversion ``args`` describe; returns what megarm_model.json records."""
    if problem := cli.save_dir_problem(args.load_dir, args.save_dir):
        raise ConversionError(problem)
    started = time.perf_counter()
    load, save = Path(args.load_dir), Path(args.save_dir)
    tp, pp = args.target_tensor_parallel_size, args.target_pipeline_parallel_size
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConversionError(
            "hf2mcore.py converts in one process; run it with python, not torchrun"
        )
    hf = hf_config_of(load)
    _report_dtype(load, stored_dtype(load, hf), args.params_dtype)
    family, arch, cfg, tokenizer_dir = _check_config(args, load, hf)
    ckpt = HFCheckpoint(load)
    ckpt.check_files()
    arch, with_score, selected = _select_weights(args, load, ckpt, family, arch, cfg)

    with cli.staged_output(save) as tmp:
        if args.format == "torch_dist":
            write_torch_dist(ckpt, cfg, selected, with_score, tmp, hf)
        else:
            heads = ("value",) if with_score else ()
            experts = Shape.of(cfg.model).routed_experts
            all_entries = family.entries(cfg.model.num_layers, heads, args.spec, experts)
            write_legacy(ckpt, cfg, all_entries, with_score, tmp, tp, pp)
        head = (
            f"{family.head_rule('value').hf[0]} of the {arch} input"
            if with_score
            else f"fresh N(0, 1/(hidden+1)) draw, seed {args.seed}"
        )
        if not with_score:
            log.info("value head initialised: %s (the LM head is not a reward head)", head)
        info = {
            "format": args.format,
            "source": str(load.resolve()),
            "family": family.name,
            "architecture": arch,
            "value_head": head,
            "output_layer": (
                _output_layer(family, cfg) if args.keep_lm_head else "none (LM head dropped)"
            ),
            "params_dtype": args.params_dtype,
            "padded_vocab_size": Shape.of(cfg.model).padded_vocab_size,
            "tensor_model_parallel_size": tp,
            "pipeline_model_parallel_size": pp,
            "iteration": ITERATION,
            "model": {k: v for k, v in to_dict(cfg)["model"].items() if k != "hf_config"},
            "hf_config": hf,
        }
        copy_side_files(tmp, load, tokenizer_dir, info)
    cli.report(log, f"wrote {args.format} checkpoint {save}", started)
    return info


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a bad input or layout)."""
    return cli.run(
        log, build_parser(), convert, (ConversionError, MappingError, FamilyError), argv
    )


if __name__ == "__main__":
    # dist_checkpointing starts worker processes: nothing may run on import.
    sys.exit(main())
