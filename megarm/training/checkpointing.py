"""torch_dist checkpoints with megatron-core ``dist_checkpointing``.

Layout (Megatron-LM's): ``<save>/iter_0000100/`` and
``<save>/latest_checkpointed_iteration.txt``. A checkpoint is written under
``iter_XXXXXXX.tmp`` and renamed when every rank has finished, then the tracker
file is replaced atomically, so an interrupted save never hides the previous
checkpoint. Loading checks every tensor's global shape against the model before
reading a byte of weights, and works at any TP/PP (dist_checkpointing reshards).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.utils import extract_sharded_tensors

from megarm import distributed, platform
from megarm.model.sharding import load_state_dict_strict

TRACKER = "latest_checkpointed_iteration.txt"
# The distributed optimizer's state in a format that reshards over TP, PP and DP
# (megatron-core 0.16 no longer supports "fully_sharded_model_space" here).
OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


class CheckpointMismatchError(ValueError):
    """The checkpoint holds tensors whose shapes do not match the configured model."""


def iteration_dir(root: str | Path, iteration: int) -> Path:
    """``<root>/iter_0000100``."""
    return Path(root) / f"iter_{iteration:07d}"


def resolve_checkpoint(load: str | Path, step: int | None = None) -> Path:
    """The checkpoint directory that ``checkpoint.load`` (and ``ckpt_step``) name.

    ``load`` may be a save root with a tracker file, a root with ``iter_*`` dirs,
    or a checkpoint directory itself (e.g. the output of ckpt_convert/hf2mcore.py).
    """
    root = Path(load)
    if step is not None:
        path = iteration_dir(root, step)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint.ckpt_step={step}: no {path}")
        return path
    tracker = root / TRACKER
    if tracker.is_file():
        text = tracker.read_text().strip()
        if text == "release":
            return root / "release"
        return iteration_dir(root, int(text))
    if (root / "metadata.json").is_file():
        return root
    candidates = sorted(root.glob("iter_[0-9]*[0-9]"))
    if candidates:
        return candidates[-1]
    raise FileNotFoundError(
        f"checkpoint.load={load}: no {TRACKER}, iter_* directory or torch_dist checkpoint there"
    )


def checkpoint_model_overrides(load: str | Path, step: int | None = None) -> list[str]:
    """``model.*`` overrides that rebuild the model a megarm checkpoint holds.

    Read from the ``megarm_config`` common state that megarm (the Trainer and
    ckpt_convert/hf2mcore.py) saves with every torch_dist checkpoint; for a checkpoint
    without it, from a ``config.json`` in ``load`` (``model.hf_config``). Parallel
    settings are not taken over: the caller picks its own layout.
    """
    path = resolve_checkpoint(load, step)
    try:
        common = dist_checkpointing.load_common_state_dict(str(path))
    except Exception:  # noqa: BLE001 - a checkpoint without common state: use config.json
        common = {}
    saved = common.get("megarm_config") if isinstance(common, dict) else None
    if saved and isinstance(saved.get("model"), dict):
        return [
            f"model.{key}={json.dumps(value)}"
            for key, value in saved["model"].items()
            # The shape is already resolved; the HF dir it came from may be gone.
            if key != "hf_config"
        ]
    config_json = Path(load) / "config.json"
    if config_json.is_file():
        return [f"model.hf_config={Path(load)}"]
    raise FileNotFoundError(
        f"{path} carries no megarm_config and {config_json} does not exist: cannot tell the "
        "model's shape. Copy the HF config.json of the model into the checkpoint directory"
    )


def model_sharded_state_dict(model: list[torch.nn.Module]) -> dict[str, Any]:
    """Sharded state dict of every model chunk (``model`` or ``model0``, ``model1``...)."""
    chunks = [getattr(m, "module", m) for m in model]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


SHAPE_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
    "num_query_groups", "kv_channels", "vocab_size", "make_vocab_size_divisible_by",
)


def check_model_config(checkpoint: Path, common: dict[str, Any], model_cfg: Any) -> None:
    """Compare the checkpoint's saved model shape with the configured one, naming
    the first differing ``model.*`` key (before any shard is read)."""
    saved = (common.get("megarm_config") or {}).get("model")
    if not saved:
        return
    for key in SHAPE_FIELDS:
        if key in saved and saved[key] != getattr(model_cfg, key):
            raise CheckpointMismatchError(
                f"{checkpoint} was saved with model.{key}={saved[key]!r} but the config has "
                f"model.{key}={getattr(model_cfg, key)!r}; set model.{key}={saved[key]!r} "
                "(or model.hf_config to the checkpoint's HF config)"
            )


def check_shapes(checkpoint: Path, sharded: dict[str, Any]) -> None:
    """Raise :class:`CheckpointMismatchError` naming the first tensor whose global
    shape differs (or that is missing), before any weight is read."""
    stored = dist_checkpointing.load_tensors_metadata(str(checkpoint))
    expected, _ = extract_sharded_tensors(sharded)
    wanted: dict[str, ShardedTensor] = {}
    for value in _leaves(expected):
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


def _leaves(tree: Any):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from _leaves(value)
    elif isinstance(tree, ShardedTensor):
        yield tree


def load_model_weights(load: str | Path, model: list[torch.nn.Module], step: int | None = None) -> Path:
    """Load model weights (any TP/PP) from a torch_dist checkpoint; return its path."""
    checkpoint = resolve_checkpoint(load, step)
    sharded = model_sharded_state_dict(model)
    check_shapes(checkpoint, sharded)
    state = dist_checkpointing.load(sharded, str(checkpoint))
    _load_model_state(model, state)
    return checkpoint


def _load_model_state(model: list[torch.nn.Module], state: dict[str, Any]) -> None:
    chunks = [getattr(m, "module", m) for m in model]
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for key, chunk in zip(keys, chunks, strict=True):
        load_state_dict_strict(chunk, state[key])


def layout() -> tuple[int, int, int]:
    """(PP, TP, DP) sizes of this run: RNG states are saved per rank of this grid."""
    return (
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_data_parallel_world_size(),
    )


def rng_sharded_object() -> ShardedObject:
    """Every RNG this rank draws from, as one ShardedObject of the (PP, TP, DP) grid."""
    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if platform.is_cuda():
        state["cuda"] = torch.cuda.get_rng_state()
    offset = (
        ps.get_pipeline_model_parallel_rank(),
        ps.get_tensor_model_parallel_rank(),
        ps.get_data_parallel_rank(),
    )
    return ShardedObject("rng_state", state, layout(), offset, replica_id=0)


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_sharded_object`."""
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and platform.is_cuda():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    save: str | Path,
    iteration: int,
    model: list[torch.nn.Module],
    common: dict[str, Any],
    optimizer: Any = None,
    scheduler: Any = None,
    keep_last: int | None = None,
) -> Path:
    """Write a checkpoint at ``iteration`` atomically and return its directory.

    ``common`` is plain Python data stored once (config, data position). With an
    ``optimizer`` the checkpoint also holds its (possibly distributed) state, the
    scheduler and every rank's RNG state, so a resumed run is exact.
    """
    root = Path(save)
    final = iteration_dir(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("iter_*.tmp"):  # left by a killed save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    state = model_sharded_state_dict(model)
    state.update(common)
    state["checkpoint_layout"] = list(layout())
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sharded_state_dict(model), metadata=OPTIM_METADATA
        )
        state["opt_param_scheduler"] = scheduler.state_dict() if scheduler is not None else None
        state["rng_state"] = rng_sharded_object()
    dist_checkpointing.save(state, str(tmp))
    _barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        tracker_tmp = root / (TRACKER + ".tmp")
        tracker_tmp.write_text(f"{iteration}\n")
        os.replace(tracker_tmp, root / TRACKER)
        if keep_last:
            done = sorted(p for p in root.glob("iter_[0-9]*[0-9]") if p.is_dir())
            for old in done[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


@dataclass
class Resumed:
    """What :func:`load_checkpoint` restored."""

    path: Path
    iteration: int
    consumed_samples: int
    full_state: bool


def load_checkpoint(
    load: str | Path,
    model: list[torch.nn.Module],
    optimizer: Any,
    scheduler: Any,
    step: int | None = None,
    finetune: bool = False,
    model_cfg: Any = None,
) -> Resumed:
    """Restore a run: model always; optimizer, scheduler, RNG and data position
    when the checkpoint has them and ``finetune`` is off. Works at a different
    TP/PP/DP (RNG states are then re-seeded rather than restored)."""
    checkpoint = resolve_checkpoint(load, step)
    common = dist_checkpointing.load_common_state_dict(str(checkpoint))
    if model_cfg is not None:
        check_model_config(checkpoint, common, model_cfg)
    sharded = model_sharded_state_dict(model)
    check_shapes(checkpoint, sharded)
    full = bool(common.get("has_optimizer")) and not finetune
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
    _load_model_state(model, state)
    if not full:
        optimizer.reload_model_params()
        return Resumed(checkpoint, 0, 0, False)
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and common.get("opt_param_scheduler"):
        scheduler.load_state_dict(common["opt_param_scheduler"])
    if same_layout:
        restore_rng(state["rng_state"])
    return Resumed(
        checkpoint, int(common["iteration"]), int(common["consumed_samples"]), True
    )


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


def _barrier() -> None:
    distributed.barrier()
