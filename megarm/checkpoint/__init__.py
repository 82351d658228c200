"""megarm's checkpoint format, shared by training, conversion and scoring.

- :mod:`~megarm.checkpoint.layout`: Megatron-LM's directory layout and tracker;
- :mod:`~megarm.checkpoint.save`: a training checkpoint, written in bounded memory
  (:mod:`~megarm.checkpoint.writer`, :mod:`~megarm.checkpoint.optimizer_state`);
- :mod:`~megarm.checkpoint.load`: verified, safe loading at any TP/PP;
- :mod:`~megarm.checkpoint.integrity`: the manifest, restricted unpicklers, finiteness;
- :mod:`~megarm.checkpoint.lock`: one writing run per directory;
- :mod:`~megarm.checkpoint.stream`: one tensor at a time, for the converters.

``python -m megarm.checkpoint verify DIR`` checks a checkpoint without loading it.
Nothing here imports :mod:`megarm.training`. The names below load their module on
first use, so ``megarm.checkpoint.layout`` stays importable without torch (the
config validator resolves ``checkpoint.load`` with it).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TRACKER": "layout",
    "CheckpointNotFoundError": "layout",
    "iteration_dir": "layout",
    "resolve_checkpoint": "layout",
    "write_tracker": "layout",
    "CheckpointCorruptError": "integrity",
    "CheckpointMismatchError": "load",
    "Resumed": "load",
    "check_shapes": "load",
    "load_checkpoint": "load",
    "load_model_weights": "load",
    "open_checkpoint": "load",
    "read_common": "load",
    "CheckpointLockedError": "lock",
    "RunLock": "lock",
    "model_sharded_state_dict": "save",
    "save_checkpoint": "save",
    "CheckpointWriteError": "writer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'megarm.checkpoint' has no attribute {name!r}")
    return getattr(importlib.import_module(f"megarm.checkpoint.{_EXPORTS[name]}"), name)
