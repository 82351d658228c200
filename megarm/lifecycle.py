"""Nothing megarm starts outlives the process that started it.

A SIGKILL runs no cleanup, so a process must notice by itself that its parent is
gone. :func:`die_with_parent` starts a daemon thread that polls the parent pid and
SIGKILLs this process when it changes (the process was re-parented: its parent
died). A thread, not Linux's ``PR_SET_PDEATHSIG``: that signal fires when the
parent *thread* that forked exits, which would kill a healthy child whose parent
forked it from a short-lived thread.

:func:`install` (called by :func:`megarm.distributed.init`) applies it to

- a worker started by torchrun, so killing the launcher stops the run instead of
  leaving workers that keep training and writing checkpoints (issue 14 item 9);
- every ``multiprocessing`` child this process forks (megatron-core's checkpoint
  writer processes);
- the ``multiprocessing`` Manager that megatron-core's ``dist_checkpointing``
  spawns for its write results (~270 MB, with a resource tracker that lives as long
  as it does): created here with an initializer, so it dies with its rank
  (issue 14 item 10).

A plain ``python -m megarm.train`` is not tied to its shell: ``nohup`` keeps working.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from typing import Any

POLL_SECONDS = 0.5

_watched_parent: int | None = None
_fork_token: Any = None  # keeps the after-fork registration alive (weakly referenced)
_manager: Any = None


def die_with_parent(poll_seconds: float = POLL_SECONDS) -> None:
    """SIGKILL this process within ``poll_seconds`` of its parent's death.

    Idempotent per process; a child forked after the call watches its own parent.
    """
    global _watched_parent
    parent = os.getppid()
    if _watched_parent == parent:
        return
    _watched_parent = parent
    if parent == 1:  # already orphaned before we could watch
        os.kill(os.getpid(), signal.SIGKILL)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="megarm-die-with-parent", daemon=True).start()


def launched_by_torchrun() -> bool:
    """Whether torchrun (torch.distributed.elastic) started this process."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def install() -> None:
    """Tie this process (when torchrun started it) and everything it starts through
    ``multiprocessing`` to their parents' lifetimes. Idempotent."""
    global _fork_token
    if launched_by_torchrun():
        die_with_parent()
    if _fork_token is None:
        from multiprocessing import util

        _fork_token = type("_ForkToken", (), {})()
        util.register_after_fork(_fork_token, lambda _token: die_with_parent())
    _guard_checkpoint_writer_queue()


def _guard_checkpoint_writer_queue() -> None:
    """Create megatron-core's async-writer results queue with a Manager whose server
    process dies with this one (megatron-core's own ``ctx.Manager()`` has no hook)."""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:  # megatron-core absent or reorganised: nothing to guard
        return
    original = filesystem_async._get_write_results_queue
    if getattr(original, "megarm_guarded", False):
        return

    def get_write_results_queue() -> Any:
        global _manager
        if filesystem_async._results_queue is None:
            from multiprocessing.managers import SyncManager

            _manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
            _manager.start(initializer=die_with_parent)
            filesystem_async._results_queue = _manager.Queue()
        return filesystem_async._results_queue

    get_write_results_queue.megarm_guarded = True  # type: ignore[attr-defined]
    filesystem_async._get_write_results_queue = get_write_results_queue
