"""megarm's checkpoint format, shared by training, conversion and scoring.

- :mod:`~megarm.checkpoint.layout`: Megatron-LM's directory layout and tracker;
- :mod:`~megarm.checkpoint.save`: a training checkpoint, written in bounded memory
  (:mod:`~megarm.checkpoint.writer`, :mod:`~megarm.checkpoint.optimizer_state`);
- :mod:`~megarm.checkpoint.load`: verified, safe loading at any TP/PP;
- :mod:`~megarm.checkpoint.integrity`: the manifest, restricted unpicklers, finiteness;
- :mod:`~megarm.checkpoint.lock`: one writing run per directory.

``python -m megarm.checkpoint verify DIR`` checks a checkpoint without loading it.
Nothing here imports :mod:`megarm.training`.
"""

from megarm.checkpoint.integrity import CheckpointCorruptError
from megarm.checkpoint.layout import (
    TRACKER,
    CheckpointNotFoundError,
    iteration_dir,
    resolve_checkpoint,
    write_tracker,
)
from megarm.checkpoint.load import (
    CheckpointMismatchError,
    Resumed,
    check_shapes,
    checkpoint_model_overrides,
    load_checkpoint,
    load_model_weights,
    open_checkpoint,
    read_common,
)
from megarm.checkpoint.lock import CheckpointLockedError, RunLock
from megarm.checkpoint.save import model_sharded_state_dict, save_checkpoint
from megarm.checkpoint.writer import CheckpointWriteError

__all__ = [
    "TRACKER",
    "CheckpointCorruptError",
    "CheckpointLockedError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CheckpointWriteError",
    "Resumed",
    "RunLock",
    "check_shapes",
    "checkpoint_model_overrides",
    "iteration_dir",
    "load_checkpoint",
    "load_model_weights",
    "model_sharded_state_dict",
    "open_checkpoint",
    "read_common",
    "resolve_checkpoint",
    "save_checkpoint",
    "write_tracker",
]
