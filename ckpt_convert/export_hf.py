"""The export behind ``ckpt_convert/mcore2hf.py``: a megarm torch_dist checkpoint as an HF ``*ForSequenceClassification`` of
its family (``Qwen2``, ``Qwen3``, ``Llama``: :mod:`megarm.families`).

    python ckpt_convert/mcore2hf.py --load-dir MCORE_DIR --save-dir HF_DIR \\
        [--iteration N] [--tokenizer-model DIR] [--max-shard-size 5GB]

The checkpoint may have been saved at any TP/PP: it is loaded in one process at
TP=1, PP=1 (megatron-core's dist_checkpointing reshards on load). The model shape
comes from the ``megarm_config`` saved with the checkpoint (or a ``config.json`` in
MCORE_DIR). The output is what ``AutoModelForSequenceClassification.from_pretrained``
(and vLLM) load with no missing or unexpected keys:

- ``model*.safetensors`` split with huggingface_hub's
  ``split_torch_state_dict_into_shards`` (``model.safetensors.index.json`` when there
  is more than one shard, as transformers itself writes them), the padded
  vocabulary rows stripped and ``score.weight`` = megarm's value head;
- ``config.json``: the family's transformers config, its keys written from the
  model config through the family's table (the one ``model.hf_config`` is read
  with), ``architectures`` the family's ``*ForSequenceClassification``,
  ``num_labels=1``, ``pad_token_id`` (from the tokenizer, else the source config), the
  family's carried keys (token ids, initialiser) from the source config, and the
  reward fields of :func:`reward_fields` (``problem_type``, ``reward_convention``,
  ``mean``/``std``);
- the tokenizer files (``--tokenizer-model``, else those in MCORE_DIR).

A critique model (a checkpoint trained with ``training.objective: sft | joint``, or
converted with ``hf2mcore.py --keep-lm-head``) has an output layer: it is exported as
``HF_DIR/causal_lm``, the family's ``*ForCausalLM`` (generation; vLLM loads it; the
output layer as ``lm_head.weight``, or tied to the embedding), and, when it also has a
value head, ``HF_DIR/reward``, the ``*ForSequenceClassification`` above; both hold the
same trunk weights.

Memory holds one output shard: the megarm tensors a shard needs are read from the
checkpoint (megatron-core's loader, any saved TP/PP) just before it is written. Everything
is written to a temporary directory next to HF_DIR and renamed when complete
(:func:`ckpt_convert.cli.staged_output`).
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# Before megatron-core is first imported: it warns at import about absent optional kernels.
from megarm import platform

# isort: split
import torch
from huggingface_hub import split_torch_state_dict_into_shards
from megatron.core import dist_checkpointing
from safetensors.torch import save_file
from transformers import AutoConfig, AutoTokenizer

from ckpt_convert import cli
from ckpt_convert.mapping import MappingError, mcore_to_hf
from megarm import distributed, families
from megarm.checkpoint import (
    check_shapes,
    open_checkpoint,
    read_common,
)
from megarm.checkpoint.integrity import CheckpointCorruptError, require_finite
from megarm.checkpoint.load import saved_model_settings
from megarm.checkpoint.metadata import CONVENTION_KEY, read_reward_stats
from megarm.checkpoint.stream import load_tensors
from megarm.config import ConfigError, MegarmConfig, ModelConfig, load_config
from megarm.data.templates import TemplateError, get_template, reward_convention, reward_pad
from megarm.data.tokenizer import load_tokenizer
from megarm.errors import ScoringError
from megarm.families import Family, Shape
from megarm.model.builder import meta_sharded_state_dict

log = logging.getLogger("mcore2hf")

# The head a reward model's export writes: megarm's value head, as
# *ForSequenceClassification's score head (a critique model's output layer goes to the
# family's *ForCausalLM: exports()).
HEADS = ("value",)


class ExportError(RuntimeError):
    """The checkpoint cannot be exported as asked; the message says why."""


# --------------------------------------------------------------------------- inputs


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise ExportError(f"{path} is not valid JSON: {exc}") from exc
    return data if isinstance(data, dict) else {}


def source_hf_config(load: Path, checkpoint: Path) -> dict[str, Any]:
    """The HF config the model came from, or ``{}``: the config.json beside the
    checkpoint (hf2mcore copies it there), else the one hf2mcore stored in the
    checkpoint's common state, else the config.json that the training run's
    ``model.hf_config`` named (a Trainer checkpoint)."""
    if (load / "config.json").is_file():
        return _read_json(load / "config.json")
    try:
        common = dist_checkpointing.load_common_state_dict(str(checkpoint))
    except Exception:  # noqa: BLE001 - no common state: nothing more to learn
        return {}
    if isinstance(common.get("hf_config"), dict):
        return common["hf_config"]
    hf_dir = ((common.get("megarm_config") or {}).get("model") or {}).get("hf_config")
    if hf_dir:
        path = Path(hf_dir) / "config.json" if Path(hf_dir).is_dir() else Path(hf_dir)
        if path.is_file():
            return _read_json(path)
    return {}


def stored_dtype(checkpoint: Path, family: Family) -> torch.dtype:
    """The dtype the checkpoint's weights were saved in (its first trunk tensor's)."""
    meta = dist_checkpointing.load_tensors_metadata(str(checkpoint))
    for entry in family.entries(1):
        key = entry.mcore
        if key in meta and getattr(meta[key], "dtype", None) is not None:
            return meta[key].dtype
    return torch.float32


def pad_token_id(
    tokenizer_dir: Path | None,
    base: dict[str, Any],
    convention: dict[str, Any] | None = None,
    requested: str | None = None,
) -> tuple[int | None, str | None]:
    """``(pad id, pad text to write into the tokenizer files or None)``: the
    tokenizer's pad when it ends no rewarded sequence, else a reserved token
    (:func:`megarm.data.templates.reward_pad`; transformers reads the score at the
    last non-pad token, so a pad equal to the end-of-turn token scores the wrong
    position); without a tokenizer, the source config's ``pad_token_id``."""
    if tokenizer_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        if convention is None:
            if requested is not None:
                raise ExportError("--pad-token needs a reward convention (none recorded or found)")
            own = tokenizer.pad_token_id
            if own is not None:
                return int(own), None
        else:
            try:
                pad, text, why = reward_pad(tokenizer, convention, requested)
            except TemplateError as exc:
                raise ExportError(str(exc)) from exc
            if why is None:
                return pad, None
            log.info("pad token: %s; the export pads with %r (id %d), which ends no rewarded "
                     "sequence", why, text, pad)
            return pad, text
    elif requested is not None:
        raise ExportError("--pad-token needs a tokenizer (--tokenizer-model)")
    value = base.get("pad_token_id")
    pad = int(value) if value is not None else None
    if pad is not None and convention is not None and pad == convention.get("reward_token_id"):
        log.warning("the source config's pad_token_id %d is the reward token: transformers will "
                    "read the reward one token early; pass --tokenizer-model", pad)
    return pad, None


def set_tokenizer_pad(out: Path, text: str) -> None:
    """Make the copied tokenizer files pad with ``text``, so what tools pad with is
    the ``pad_token_id`` the model skips."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = out / name
        if path.is_file():
            data = json.loads(path.read_text())
            data["pad_token"] = text
            path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    path = out / "tokenizer.json"
    if path.is_file():
        data = json.loads(path.read_text())
        if isinstance(data.get("padding"), dict):
            data["padding"]["pad_token"] = text
            data["padding"]["pad_id"] = AutoTokenizer.from_pretrained(str(out)).convert_tokens_to_ids(text)
            path.write_text(json.dumps(data, ensure_ascii=False))


def tokenizer_source(args: argparse.Namespace, load: Path) -> Path | None:
    """``--tokenizer-model``, else MCORE_DIR when it holds tokenizer files."""
    if args.tokenizer_model:
        path = Path(args.tokenizer_model)
        if not cli.has_tokenizer(path):
            raise ExportError(
                f"--tokenizer-model {path} holds none of {', '.join(cli.TOKENIZER_FILES[:3])}"
            )
        return path
    if cli.has_tokenizer(load):
        return load
    return None


# --------------------------------------------------------------------------- outputs


def hf_config(
    model: ModelConfig,
    base: dict[str, Any],
    pad_id: int | None,
    dtype: torch.dtype,
    causal_lm: bool = False,
    token_classification: bool = False,
) -> Any:
    """transformers' config of the exported reward model: the family's keys written
    from ``model`` by its table, the keys it carries over from the source config
    ``base``, one label (or, ``causal_lm``, the family's ``*ForCausalLM``; or,
    ``token_classification``, a process reward model's ``*ForTokenClassification``
    with one label, ``step_correct``, whose sigmoid is the step's probability of
    being correct)."""
    family = families.family(model.family)
    kwargs: dict[str, Any] = {key: base[key] for key in family.carried if key in base}
    kwargs.update(family.write(model))
    model_type = kwargs.pop("model_type")
    kwargs.update(pad_token_id=pad_id)
    if causal_lm:
        kwargs.update(architectures=[family.causal_lm])
    elif token_classification:
        kwargs.update(architectures=[family.token_classification], num_labels=1,
                      id2label={0: "step_correct"}, label2id={"step_correct": 0},
                      classifier_dropout=0.0)
    else:
        # A regression head (training.objective regression) names its attributes.
        names = ([n.strip() for n in model.label_names.split(",")] if model.label_names
                 else [f"LABEL_{i}" for i in range(model.num_labels)])
        kwargs.update(
            architectures=[family.sequence_classification],
            num_labels=len(names),
            id2label=dict(enumerate(names)),
            label2id={name: i for i, name in enumerate(names)},
        )
    config = AutoConfig.for_model(model_type, **kwargs)
    # transformers 5 calls it ``dtype``, 4.x ``torch_dtype``.
    accepted = inspect.signature(type(config).__init__).parameters
    setattr(config, "dtype" if "dtype" in accepted else "torch_dtype", str(dtype).removeprefix("torch."))
    return config


# Reward fields of a source config.json that this export decides afresh (reward_fields):
# a stale mean/std of the model trained from would mis-normalise the new one.
REWARD_KEYS = ("problem_type", CONVENTION_KEY, "mean", "std")


def write_legacy_keys(out: Path, model: ModelConfig, base: dict[str, Any], dtype: torch.dtype) -> None:
    """Rewrite ``out/config.json`` (as transformers 5 saved it) so transformers 4.x
    reads the same model: every key of the source config ``base``, transformers 5's,
    and the family's keys in 4.x's spelling (:meth:`megarm.families.Family.export_config`)."""
    path = out / "config.json"
    saved = json.loads(path.read_text())
    source = {k: v for k, v in base.items() if k not in REWARD_KEYS}
    merged = families.family(model.family).export_config(
        saved, model, source, str(dtype).removeprefix("torch."))
    path.write_text(json.dumps(merged, indent=2) + "\n")


def reward_fields(checkpoint: Path, tokenizer_dir: Path | None) -> dict[str, Any]:
    """config.json fields a serving stack needs to read the reward as megarm trained it:
    ``problem_type: regression`` (vLLM otherwise returns ``sigmoid(reward)`` for one
    label), the ``reward_convention`` (recorded in the checkpoint by training, else the
    tokenizer's chat template's) and the ``mean``/``std`` that ``megarm.reward_stats``
    stored in ``reward_stats.json`` beside the weights (OpenRLHF's normalisation)."""
    fields: dict[str, Any] = {"problem_type": "regression"}
    # Weights-only, as every megarm read of common.pt; no common state: nothing recorded.
    common = read_common(checkpoint) if (checkpoint / "common.pt").is_file() else {}
    convention = common.get(CONVENTION_KEY)
    if convention is None and tokenizer_dir is not None:
        try:
            tokenizer = load_tokenizer(str(tokenizer_dir))
            convention = reward_convention(get_template("auto", tokenizer), tokenizer)
            log.info("no reward convention recorded in %s; recording the chat template's "
                     "(sequences end with %r)", checkpoint, convention["sequence_end"])
        except TemplateError as exc:
            log.warning("no reward convention recorded and none from the tokenizer: %s", exc)
    if convention is not None:
        fields[CONVENTION_KEY] = convention
    recorded = read_reward_stats(checkpoint)
    if recorded is not None:
        fields.update(mean=float(recorded["mean"]), std=float(recorded["std"]))
    return fields


def write_weights(
    load: Callable[[list[str]], dict[str, torch.Tensor]],
    model: ModelConfig,
    out: Path,
    dtype: torch.dtype,
    max_shard_size: str,
    source: Path | None = None,
    heads: tuple[str, ...] = HEADS,
    extra: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """HF safetensors shards (and the index when there are several). Shards are
    planned from shapes alone; then, shard by shard, ``load(names)`` reads just the
    megarm tensors (state-dict names) that shard needs, so memory holds one shard.
    ``heads``: the output heads to write (``value``; ``lm`` for a critique model's
    untied output layer). ``extra``: HF tensors written as given (a process reward
    model's zero ``score.bias``)."""
    extra = extra or {}
    family, shape = families.family(model.family), Shape.of(model)
    selected = family.entries(shape.num_layers, heads, experts=shape.routed_experts)
    planned = {
        name: torch.empty(size, dtype=dtype, device="meta")
        for name, size in family.hf_shapes(shape, heads).items()
    }
    planned.update({name: torch.empty(t.shape, dtype=dtype, device="meta")
                    for name, t in extra.items()})
    split = split_torch_state_dict_into_shards(planned, max_shard_size=max_shard_size)
    for number, (filename, names) in enumerate(split.filename_to_tensors.items(), 1):
        wanted = set(names)
        needed = [e for e in selected if wanted & set(e.hf)]
        state = load([e.mcore for e in needed])
        require_finite(state.items(), source or Path("checkpoint"))  # names a damaged tensor
        tensors = {
            name: tensor.to(dtype).contiguous()
            for name, tensor in mcore_to_hf(state.__getitem__, shape, needed)
            if name in wanted
        }
        tensors.update({name: t.to(dtype) for name, t in extra.items() if name in wanted})
        del state
        save_file(tensors, str(out / filename), metadata={"format": "pt"})
        del tensors
        log.info("wrote %s (%d/%d)", filename, number, len(split.filename_to_tensors))
    if split.is_sharded:
        index = {"metadata": dict(split.metadata), "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return {"files": list(split.filename_to_tensors), "total_size": split.metadata["total_size"]}


# --------------------------------------------------------------------------- driver


def trained_objective(checkpoint: Path) -> str:
    """The ``training.objective`` the checkpoint was saved with (``rm`` when unrecorded)."""
    common = read_common(checkpoint) if (checkpoint / "common.pt").is_file() else {}
    return ((common.get("megarm_config") or {}).get("training") or {}).get("objective", "rm")


def exports(checkpoint: Path, model: ModelConfig) -> list[tuple[str, tuple[str, ...], bool]]:
    """What to write: ``(subdirectory, heads, causal LM?)`` per HF model. A checkpoint
    with an output layer (saved for ``training.objective`` sft or joint) gives
    ``causal_lm`` and, with a value head, ``reward``; a reward model gives ``.``."""
    stored = dist_checkpointing.load_tensors_metadata(str(checkpoint))
    common = read_common(checkpoint) if (checkpoint / "common.pt").is_file() else {}
    objective = ((common.get("megarm_config") or {}).get("training") or {}).get("objective", "rm")
    value = families.head_weight("value") in stored
    if objective not in ("sft", "joint"):
        return [(".", ("value",), False)]
    if not model.tie_word_embeddings and families.head_weight("lm") not in stored:
        raise ExportError(
            f"{checkpoint} was trained with training.objective={objective} but holds no "
            f"{families.head_weight('lm')} (and model.tie_word_embeddings is false)"
        )
    lm_heads = () if model.tie_word_embeddings else ("lm",)
    return [("causal_lm", lm_heads, True)] + ([("reward", ("value",), False)] if value else [])


def _checkpoint_config(
    args: argparse.Namespace, load: Path
) -> tuple[Path, MegarmConfig, torch.dtype]:
    """The verified checkpoint, the config that rebuilds its model (in the stored
    dtype, so the export is bit-exact) and the dtype to write."""
    try:
        # Files as written at save, nothing that runs code when read.
        checkpoint = open_checkpoint(load, args.iteration).path
        saved = saved_model_settings(load, args.iteration)
    except (FileNotFoundError, CheckpointCorruptError) as exc:
        raise ExportError(str(exc)) from exc
    try:
        cfg = load_config(None, ["training.seed=0"], settings=saved)
    except ConfigError as exc:
        raise ExportError(f"{checkpoint}: {exc}") from exc
    stored = stored_dtype(checkpoint, families.family(cfg.model.family))
    cfg.model.params_dtype = platform.dtype_name(stored) or "fp32"  # type: ignore[assignment]
    out_dtype = stored if args.params_dtype == "auto" else platform.DTYPES[args.params_dtype]
    return checkpoint, cfg, out_dtype


def export(args: argparse.Namespace) -> dict[str, Any]:
    """Run the export ``args`` describe; returns a summary."""
    if problem := cli.save_dir_problem(args.load_dir, args.save_dir):
        raise ExportError(problem)
    started = time.perf_counter()
    load, save = Path(args.load_dir), Path(args.save_dir)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ExportError("mcore2hf.py exports in one process; run it with python, not torchrun")
    if save.exists() and not args.overwrite:
        raise ExportError(f"--save-dir {save} exists; remove it or pass --overwrite")
    checkpoint, cfg, out_dtype = _checkpoint_config(args, load)
    tokenizer_dir = tokenizer_source(args, load)
    if tokenizer_dir is not None and (
        problem := cli.tokenizer_problem(tokenizer_dir, cfg.model.vocab_size, load)
    ):
        raise ExportError(problem)
    base = source_hf_config(load, checkpoint)
    fields = reward_fields(checkpoint, tokenizer_dir)
    pad_id, pad_text = pad_token_id(tokenizer_dir, base, fields.get(CONVENTION_KEY), args.pad_token)
    if pad_id is None:
        log.warning(
            "no pad_token_id (no tokenizer and none in a source config.json): transformers "
            "then scores only batches of one; pass --tokenizer-model"
        )

    plan = exports(checkpoint, cfg.model)
    has_lm, has_value = plan[0][2], any(not lm for _, _, lm in plan)
    prm = trained_objective(checkpoint) == "prm"
    # transformers' *ForTokenClassification has a score bias (4.x always): a zero one
    # keeps the logits megarm's and the load free of missing keys in every version.
    extra = {"score.bias": torch.zeros(1)} if prm else None
    if prm and not (fields.get(CONVENTION_KEY) or {}).get("step_marker"):
        raise ExportError(
            f"{checkpoint} is a process reward model without a recorded step marker (it was "
            "trained on synthetic data); train it on data from tools/preprocess_data.py "
            "--handler-name prm_steps or math_shepherd so the export can name its marker"
        )
    # The meta model (checkpoint keys) with exactly the heads the checkpoint holds.
    cfg.training.objective = ("joint" if has_lm and has_value else "sft" if has_lm
                              else "regression" if cfg.model.num_labels > 1 else "rm")
    # One process of its own, whatever launched it.
    # (a world of one opens no TCP store: megarm.distributed uses an in-memory one)
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    written: dict[str, Any] = {}
    with cli.staged_output(save) as tmp:
        distributed.init(1, 1, seed=0)
        try:
            sharded = meta_sharded_state_dict(cfg)
            check_shapes(checkpoint, sharded)  # names a mismatched tensor before any read
            for subdir, heads, _ in plan:
                (tmp / subdir).mkdir(exist_ok=True)
                written[subdir] = write_weights(
                    lambda names: load_tensors(checkpoint, sharded, names),
                    cfg.model,
                    tmp / subdir,
                    out_dtype,
                    args.max_shard_size,
                    checkpoint,
                    heads,
                    extra if not heads or "value" in heads else None,
                )
        finally:
            distributed.teardown()
        for subdir, _, causal_lm in plan:
            config = hf_config(cfg.model, base, pad_id, out_dtype, causal_lm, prm)
            for key, value in fields.items():
                # The causal LM carries where its critique model reads the reward too.
                if not causal_lm or key == CONVENTION_KEY:
                    setattr(config, key, value)
            if prm:  # where the per-step rewards are read, at the top for other tools
                convention = fields[CONVENTION_KEY]
                config.step_marker = convention["step_marker"]
                config.step_marker_id = int(convention["step_marker_id"])
            config.save_pretrained(str(tmp / subdir))
            write_legacy_keys(tmp / subdir, cfg.model, base, out_dtype)
            copied = cli.copy_tokenizer(tokenizer_dir, tmp / subdir) if tokenizer_dir else []
            if pad_text is not None:
                set_tokenizer_pad(tmp / subdir, pad_text)
    weights = written[plan[0][0]]
    family = families.family(cfg.model.family)
    names = ", ".join(
        (family.causal_lm if lm else family.token_classification if prm
         else family.sequence_classification)
        + ("" if sub == "." else f" in {sub}/")
        for sub, _, lm in plan
    )
    cli.report(
        log,
        f"exported {checkpoint} ({len(weights['files'])} shard(s), "
        f"{str(out_dtype).removeprefix('torch.')}, {names}) to {save}",
        started,
    )
    return {"checkpoint": str(checkpoint), "tokenizer_files": copied,
            "exports": [sub for sub, _, _ in plan], **weights}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mcore2hf.py``'s command line; returns the exit status (2 for a bad input)."""
    from ckpt_convert.mcore2hf import build_parser

    return cli.run(
        log, build_parser(), export, (ExportError, MappingError, CheckpointCorruptError, ScoringError),
        argv,
    )
