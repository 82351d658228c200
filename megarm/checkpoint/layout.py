"""Where checkpoints live on disk: Megatron-LM's layout and its tracker file.

``<root>/iter_0000100/`` holds one checkpoint (megatron-core torch_dist: DCP files,
``.metadata``, ``common.pt``, ``metadata.json``, and megarm's
``megarm_integrity.json``); ``<root>/latest_checkpointed_iteration.txt`` names the
newest complete one. A checkpoint is written as ``iter_XXXXXXX.tmp`` and renamed
when complete, and the tracker is replaced atomically, so a reader never sees a
partial checkpoint.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

TRACKER = "latest_checkpointed_iteration.txt"
_ITER = re.compile(r"^iter_(\d{7})$")


class CheckpointNotFoundError(FileNotFoundError):
    """``checkpoint.load`` (or a tool's ``--load``) names no usable checkpoint."""


def iteration_dir(root: str | Path, iteration: int) -> Path:
    """``<root>/iter_0000100``."""
    return Path(root) / f"iter_{iteration:07d}"


def staging_dir(final: Path) -> Path:
    """Where the checkpoint that will become ``final`` is written."""
    return final.with_name(final.name + ".tmp")


def completed_iterations(root: str | Path) -> list[int]:
    """Iterations with a complete (renamed) checkpoint directory under ``root``, ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _ITER.match(path.name)
        if match and path.is_dir():
            found.append(int(match.group(1)))
    return sorted(found)


def read_tracker(root: str | Path) -> int | str | None:
    """The iteration ``<root>/latest_checkpointed_iteration.txt`` names (or
    ``"release"``); ``None`` without a tracker. A tracker holding anything else is
    an error naming the file."""
    tracker = Path(root) / TRACKER
    if tracker.exists() and not tracker.is_file():
        # Training would resume, train, then fail to rename its tracker over it.
        raise CheckpointNotFoundError(
            f"{tracker} is not a file (a directory?); remove it and write the iteration of "
            f"a complete iter_* directory into a file of that name (found: "
            f"{completed_iterations(root) or 'none'})"
        )
    if not tracker.is_file():
        return None
    text = tracker.read_text(errors="replace").strip()
    if text == "release":
        return text
    if not text.isdigit():
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise CheckpointNotFoundError(
            f"{tracker} holds {shown!r}, not an iteration number; write the iteration of a "
            f"complete iter_* directory into it (found: {completed_iterations(root) or 'none'}) "
            "or pass checkpoint.ckpt_step"
        )
    return int(text)


def write_tracker(root: str | Path, iteration: int) -> None:
    """Point the tracker at ``iteration``, atomically (write a temp file, rename)."""
    tracker = Path(root) / TRACKER
    tmp = tracker.with_name(TRACKER + ".tmp")
    tmp.write_text(f"{iteration}\n")
    os.replace(tmp, tracker)


def is_checkpoint_dir(path: Path) -> bool:
    """``path`` itself is one torch_dist checkpoint."""
    return (path / "metadata.json").is_file() and (path / ".metadata").is_file()


def resolve_checkpoint(load: str | Path, step: int | None = None) -> Path:
    """The checkpoint directory that ``checkpoint.load`` (and ``ckpt_step``) name.

    ``load`` may be a save root with a tracker file, a root with ``iter_*`` dirs,
    or a checkpoint directory itself (e.g. the output of ckpt_convert/hf2mcore.py).
    """
    root = Path(load)
    if not root.exists():
        raise CheckpointNotFoundError(f"checkpoint.load={load}: no such directory")
    if step is not None:
        path = iteration_dir(root, step)
        if not path.is_dir():
            raise CheckpointNotFoundError(
                f"checkpoint.ckpt_step={step}: no {path} (complete checkpoints: "
                f"{completed_iterations(root) or 'none'})"
            )
        return path
    named = read_tracker(root)
    if named == "release":
        return root / "release"
    if named is not None:
        path = iteration_dir(root, int(named))
        if not path.is_dir():
            raise CheckpointNotFoundError(
                f"{root / TRACKER} names iteration {named} but {path} does not exist "
                f"(complete checkpoints: {completed_iterations(root) or 'none'}); fix the "
                "tracker or pass checkpoint.ckpt_step"
            )
        return path
    if is_checkpoint_dir(root):
        return root
    done = completed_iterations(root)
    if done:
        return iteration_dir(root, done[-1])
    partial = sorted(p.name for p in root.glob("iter_*.tmp"))
    hint = f" (only unfinished saves: {', '.join(partial)})" if partial else ""
    raise CheckpointNotFoundError(
        f"checkpoint.load={load} holds no checkpoint{hint}: no {TRACKER}, iter_* directory "
        "or torch_dist checkpoint there"
    )


def prune(root: Path, keep_last: int) -> list[Path]:
    """Remove all but the newest ``keep_last`` complete checkpoints; return them."""
    removed = []
    for iteration in completed_iterations(root)[:-keep_last]:
        path = iteration_dir(root, iteration)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed
