"""torch_dist checkpoints with megatron-core ``dist_checkpointing``.

Layout (Megatron-LM's): ``<save>/iter_0000100/`` and
``<save>/latest_checkpointed_iteration.txt``. A checkpoint is written under
``iter_XXXXXXX.tmp`` and renamed when every rank has finished, then the tracker
file is replaced atomically, so an interrupted save never hides the previous
checkpoint. Loading checks every tensor's global shape against the model before
reading a byte of weights, and works at any TP/PP (dist_checkpointing reshards).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.dist_checkpointing.utils import extract_sharded_tensors

TRACKER = "latest_checkpointed_iteration.txt"


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


def model_sharded_state_dict(model: list[torch.nn.Module]) -> dict[str, Any]:
    """Sharded state dict of every model chunk (``model`` or ``model0``, ``model1``...)."""
    chunks = [getattr(m, "module", m) for m in model]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


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
    chunks = [getattr(m, "module", m) for m in model]
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for key, chunk in zip(keys, chunks, strict=True):
        chunk.load_state_dict(state[key], strict=True)
    return checkpoint


def save_checkpoint(
    save: str | Path, iteration: int, model: list[torch.nn.Module], common: dict[str, Any]
) -> Path:
    """Write the model at ``iteration`` atomically; ``common`` (plain Python data,
    e.g. the resolved config) is stored alongside. Returns the final directory."""
    root = Path(save)
    final = iteration_dir(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    state = model_sharded_state_dict(model)
    state.update(common)
    dist_checkpointing.save(state, str(tmp))
    _barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        tracker_tmp = root / (TRACKER + ".tmp")
        tracker_tmp.write_text(f"{iteration}\n")
        os.replace(tracker_tmp, root / TRACKER)
    _barrier()
    return final


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
