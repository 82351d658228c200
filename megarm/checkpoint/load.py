"""Load a checkpoint: prove it intact and safe, check it fits the model, then read it.

Every load (training's resume, converted weights, scoring, export) goes through
:func:`open_checkpoint`: the directory is resolved, the integrity manifest checked
(sizes, and xxh3 checksums with ``verify="checksum"``; the files are shared out
over the ranks), the pickled parts parsed with restricted unpicklers, and
``common.pt`` read weights-only. Only then does megatron-core's
``dist_checkpointing.load`` read the tensors, at any TP/PP (it reshards). The
weights it yields must be finite.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.utils import extract_sharded_tensors

from megarm import distributed, platform
from megarm.checkpoint.integrity import (
    CheckpointCorruptError,
    check_safe_to_read,
    load_common,
    manifest_problems,
    non_finite,
    read_manifest,
)
from megarm.checkpoint.layout import resolve_checkpoint
from megarm.checkpoint.optimizer_state import SHARDING_TYPE
from megarm.checkpoint.save import layout, model_sharded_state_dict, rng_sharded_object

Verify = Literal["checksum", "size"]
OPTIM_METADATA = {"distrib_optim_sharding_type": SHARDING_TYPE}


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the configured model or run; the message names the key."""


@dataclass
class Opened:
    """A resolved, verified checkpoint and its common state."""

    path: Path
    common: dict[str, Any]


def verify_files(checkpoint: Path, verify: Verify = "checksum") -> list[str]:
    """Problems with ``checkpoint``'s files against its manifest (empty when intact),
    the work shared over all ranks. A checkpoint without a manifest is accepted with
    a warning (written by an older megarm or another tool)."""
    files = read_manifest(checkpoint)
    if files is None:
        warnings.warn(
            f"{checkpoint} has no integrity manifest (megarm_integrity.json): its files "
            "cannot be checked", stacklevel=2
        )
        return []
    names = sorted(files)
    world = torch.distributed.get_world_size() if _initialized() else 1
    rank = torch.distributed.get_rank() if _initialized() else 0
    mine = manifest_problems(checkpoint, files, names[rank::world], verify == "checksum")
    return [p for part in distributed.all_gather_objects(mine) for p in part]


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def open_checkpoint(load: str | Path, step: int | None = None, verify: Verify = "checksum") -> Opened:
    """Resolve ``load`` (and ``step``), verify the files, refuse unsafe pickles, read
    ``common.pt``. Raises :class:`CheckpointCorruptError` naming the file."""
    checkpoint = resolve_checkpoint(load, step)
    problems = verify_files(checkpoint, verify)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointCorruptError(
            f"{checkpoint} is damaged: {problems[0]}{more}. Load an earlier iteration "
            "(checkpoint.ckpt_step) or re-create it"
        )
    check_safe_to_read(checkpoint)
    return Opened(checkpoint, load_common(checkpoint))


def read_common(load: str | Path, step: int | None = None) -> dict[str, Any]:
    """The common state of a checkpoint, safely, without verifying the data files
    (for tools that only need the saved config)."""
    return load_common(resolve_checkpoint(load, step))


SHAPE_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
    "num_query_groups", "kv_channels", "vocab_size", "make_vocab_size_divisible_by",
)
# Fields that change what the same tensors compute: a checkpoint loaded with another
# value has every shape right and silently wrong outputs.
ARCHITECTURE_FIELDS = (
    "family", "add_qkv_bias", "qk_layernorm", "rotary_base", "norm_epsilon",
    "use_rope_scaling", "rope_scaling_factor", "rope_low_freq_factor",
    "rope_high_freq_factor", "rope_original_max_positions",
)


def check_model_config(checkpoint: Path, common: dict[str, Any], model_cfg: Any) -> None:
    """Compare the checkpoint's saved model (shape and the fields that change what its
    tensors compute, such as RoPE) with the configured one, naming the first
    differing ``model.*`` key (before any shard is read). Fields a checkpoint was
    saved without (an older megarm) are not compared."""
    saved = (common.get("megarm_config") or {}).get("model")
    if not saved:
        return
    for key in SHAPE_FIELDS + ARCHITECTURE_FIELDS:
        if key in saved and saved[key] != getattr(model_cfg, key):
            raise CheckpointMismatchError(
                f"{checkpoint} was saved with model.{key}={saved[key]!r} but the config has "
                f"model.{key}={getattr(model_cfg, key)!r}; set model.{key}={saved[key]!r} "
                "(or model.hf_config to the checkpoint's HF config)"
            )


# What a resumed run must share with the run that saved, so that its data position
# (consumed samples) means the same pairs in the same order.
RESUME_KEYS = (("data", "data_path"), ("data", "split"), ("training", "seed"))


def check_resume_config(checkpoint: Path, common: dict[str, Any], cfg: Any) -> None:
    """Refuse to resume a run on other data, split or seed than it was trained on,
    naming both values; ``checkpoint.finetune`` or ``checkpoint.allow_data_change``
    says it is meant."""
    saved = common.get("megarm_config") or {}
    if not saved or cfg.checkpoint.finetune or cfg.checkpoint.allow_data_change:
        return
    for section, key in RESUME_KEYS:
        before = (saved.get(section) or {}).get(key, "<missing>")
        now = getattr(getattr(cfg, section), key)
        if before != now:
            raise CheckpointMismatchError(
                f"{checkpoint} was trained with {section}.{key}={before!r}, this run has "
                f"{section}.{key}={now!r}: resuming would continue at a data position that "
                "means other pairs. Set it back, or pass checkpoint.finetune=true (weights "
                "only) or checkpoint.allow_data_change=true (keep optimizer and position)"
            )


def check_expert_optimizer(checkpoint: Path, common: dict[str, Any], cfg: Any) -> None:
    """A mixture of experts' optimizer state is restorable only between runs that both
    split the experts (EP > 1) or both do not: megatron-core steps expert-parallel
    experts with an optimizer of their own (a chain of a dense and an expert
    optimizer), so the state's entries are keyed differently. The weights reshard to
    any EP; refused naming both values, before any shard is read."""
    if not cfg.model.num_moe_experts or cfg.checkpoint.finetune:
        return
    saved = ((common.get("megarm_config") or {}).get("parallel") or {}).get("expert_model_parallel_size", 1)
    now = cfg.parallel.expert_model_parallel_size
    if (saved > 1) != (now > 1):
        raise CheckpointMismatchError(
            f"{checkpoint} was trained at parallel.expert_model_parallel_size={saved}, this run has "
            f"{now}: megatron-core keeps the optimizer state of split experts (EP > 1) apart "
            "from the rest, so it cannot be restored at EP=1, nor an EP=1 state at EP > 1. "
            f"Resume at an EP {'> 1' if saved > 1 else 'of 1'}, or pass checkpoint.finetune=true "
            "to start from its weights (they load at any EP)"
        )


def check_shapes(checkpoint: Path, sharded: dict[str, Any]) -> None:
    """Raise :class:`CheckpointMismatchError` naming the first tensor whose global
    shape differs (or that is missing), before any weight is read."""
    stored = dist_checkpointing.load_tensors_metadata(str(checkpoint))
    expected, _ = extract_sharded_tensors(sharded)
    wanted: dict[str, ShardedTensor] = {}
    for value in _tensors(expected):
        wanted[value.key] = value
    problems = []
    for key in sorted(wanted):
        if key not in stored:
            problems.append(f"{key}: missing from the checkpoint")
        elif tuple(stored[key].global_shape) != tuple(wanted[key].global_shape):
            problems.append(
                f"{key}: checkpoint has shape {tuple(stored[key].global_shape)}, the configured "
                f"model needs {tuple(wanted[key].global_shape)}"
            )
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointMismatchError(
            f"{checkpoint} does not match the model config: {problems[0]}{more}. Check "
            "model.hidden_size / num_layers / vocab_size / num_query_groups against the "
            "checkpoint's model (model.hf_config reads them from the HF config.json)."
        )


def _tensors(tree: Any):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _tensors(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from _tensors(value)
    elif isinstance(tree, ShardedTensor):
        yield tree


def _without_extra_state(tree: Any) -> Any:
    """The sharded state dict minus transformer-engine ``_extra_state`` objects: megarm
    does not train in FP8, so TE keeps its own, and their pickled payloads are never
    deserialised."""
    if isinstance(tree, dict):
        return {
            k: _without_extra_state(v)
            for k, v in tree.items()
            if not (isinstance(v, ShardedObject) and str(k).endswith("_extra_state"))
        }
    return tree


def _load_model_state(model: list[torch.nn.Module], state: dict[str, Any], checkpoint: Path) -> None:
    chunks = [getattr(m, "module", m) for m in model]
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for key, chunk in zip(keys, chunks, strict=True):
        chunk.load_state_dict_strict(state[key])  # the model owns its strict load
    bad = [str(b) for chunk in chunks for b in non_finite(chunk.state_dict().items())]
    found = [b for part in distributed.all_gather_objects(bad) for b in part]
    if found:
        listed = "; ".join(found[:3]) + (f"; and {len(found) - 3} more" if len(found) > 3 else "")
        raise CheckpointCorruptError(
            f"{checkpoint} yields non-finite weights: {listed}. The checkpoint is damaged or "
            "was saved after training diverged; load an earlier iteration (checkpoint.ckpt_step)"
        )


def load_model_weights(
    load: str | Path, model: list[torch.nn.Module], step: int | None = None, verify: Verify = "checksum"
) -> Path:
    """Load model weights (any TP/PP) from a torch_dist checkpoint; return its path."""
    opened = open_checkpoint(load, step, verify)
    sharded = _without_extra_state(model_sharded_state_dict(model))
    check_shapes(opened.path, sharded)
    state = dist_checkpointing.load(sharded, str(opened.path))
    _load_model_state(model, state, opened.path)
    return opened.path


@dataclass
class Resumed:
    """What :func:`load_checkpoint` restored."""

    path: Path
    iteration: int
    consumed_samples: int
    full_state: bool


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`megarm.checkpoint.save.rng_sharded_object`."""
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and platform.is_cuda():
        torch.cuda.set_rng_state(state["cuda"])


def load_checkpoint(
    cfg: Any,
    model: list[torch.nn.Module],
    optimizer: Any,
    scheduler: Any,
) -> Resumed:
    """Restore a run from ``cfg.checkpoint.load``: model always; optimizer, scheduler,
    RNG and data position when the checkpoint has them and ``finetune`` is off.
    Works at a different TP/PP/DP (RNG states are then re-seeded rather than
    restored)."""
    c = cfg.checkpoint
    opened = open_checkpoint(c.load, c.ckpt_step, c.verify)
    checkpoint, common = opened.path, opened.common
    check_model_config(checkpoint, common, cfg.model)
    full = bool(common.get("has_optimizer")) and not c.finetune
    if full:
        check_resume_config(checkpoint, common, cfg)
        check_expert_optimizer(checkpoint, common, cfg)
    sharded = _without_extra_state(model_sharded_state_dict(model))
    check_shapes(checkpoint, sharded)
    request = dict(sharded)
    same_layout = list(common.get("checkpoint_layout", [])) == list(layout())
    if full:
        _init_optimizer_state(optimizer)
        request["optimizer"] = optimizer.sharded_state_dict(
            model_sharded_state_dict(model), is_loading=True, metadata=OPTIM_METADATA
        )
        if same_layout:
            request["rng_state"] = rng_sharded_object()
    state = dist_checkpointing.load(request, str(checkpoint))
    _load_model_state(model, state, checkpoint)
    if not full:
        optimizer.reload_model_params()
        return Resumed(checkpoint, 0, 0, False)
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and common.get("opt_param_scheduler"):
        scheduler.load_state_dict(common["opt_param_scheduler"])
    if same_layout:
        restore_rng(state["rng_state"])
    return Resumed(checkpoint, int(common["iteration"]), int(common["consumed_samples"]), True)


def _init_optimizer_state(optimizer: Any) -> None:
    """Give every parameter Adam state (with a ``step``) before a load request.

    The distributed optimizer's ``sharded_state_dict(is_loading=True)`` reads the
    step from existing state; with torch's Adam (no apex / TE) a run that has not
    stepped yet has none. The values are overwritten by the load.
    """
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_opt = getattr(inner, "optimizer", None)
        if torch_opt is None:
            continue
        if getattr(inner, "init_state_fn", None) is not None:
            inner.init_state_fn(torch_opt, getattr(inner, "config", None))
        for group in torch_opt.param_groups:
            for param in group["params"]:
                torch_opt.state[param].setdefault("step", torch.tensor(0.0))


def saved_model_settings(load: str | Path, step: int | None = None) -> dict[str, dict[str, Any]]:
    """The ``model`` settings (typed values, for ``load_config(settings=...)``) that
    rebuild the model a megarm checkpoint holds.

    Read from the ``megarm_config`` common state that megarm (the Trainer and
    ckpt_convert/hf2mcore.py) saves with every torch_dist checkpoint; for a checkpoint
    without it, from a ``config.json`` in ``load`` (``model.hf_config``). Parallel
    settings are not taken over: the caller picks its own layout.
    """
    checkpoint = resolve_checkpoint(load, step)
    common = load_common(checkpoint) if (checkpoint / "common.pt").is_file() else {}
    saved = common.get("megarm_config")
    if saved and isinstance(saved.get("model"), dict):
        # The shape is already resolved; the HF dir it came from may be gone.
        return {"model": {k: v for k, v in saved["model"].items() if k != "hf_config"}}
    config_json = Path(load) / "config.json"
    if config_json.is_file():
        return {"model": {"hf_config": str(Path(load))}}
    raise FileNotFoundError(
        f"{checkpoint} carries no megarm_config and {config_json} does not "
        "exist: cannot tell the model's shape. Copy the HF config.json of the model into the "
        "checkpoint directory"
    )
