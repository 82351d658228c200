"""Run code the way tests and benchmarks need: on N gloo ranks, or measured.

:func:`run_distributed` runs a function on N ranks and collects each rank's result:
every rank is a spawned process with torchrun's environment variables set, so code
under test sees exactly what ``torchrun`` would give it. A failure on any rank
raises in the caller with that rank's traceback; a hang raises after ``timeout``
seconds. :func:`measure_peak_rss` (from :mod:`megarm.platform.host`) runs a script in a
fresh interpreter and reports its own peak memory.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import queue
import signal
import socket
import traceback
from collections.abc import Callable
from typing import Any

# Measuring a process's memory is not test-only (the converters report it, the
# benchmarks measure with it): it lives in megarm.platform.host.
from megarm.platform.host import measure_peak_rss, peak_rss_bytes

__all__ = ["RankFailure", "free_port", "measure_peak_rss", "peak_rss_bytes", "run_distributed"]


class RankFailure(RuntimeError):
    """A rank raised (its traceback is in the message) or the group timed out."""


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _child(
    rank: int,
    world_size: int,
    port: int,
    fn: Callable[..., Any],
    args: tuple,
    env: dict[str, str],
    results: mp.Queue,
) -> None:
    # Own process group: the parent can kill this rank with anything it spawned;
    # and the rank dies with the test process even when that is SIGKILLed.
    os.setpgrp()
    from megarm import lifecycle

    lifecycle.die_with_parent()
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    import torch

    # Ranks share few cores: one thread each avoids oversubscription.
    torch.set_num_threads(1)
    try:
        # Plain pickle copies tensors into bytes; the queue's own pickler would
        # share their memory, which vanishes when this process exits.
        results.put((rank, True, pickle.dumps(fn(*args))))
    except BaseException:  # noqa: BLE001 - surfaced verbatim in the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        from megarm import distributed

        distributed.teardown()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300.0,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` spawned ranks; return results by rank.

    ``fn`` must be importable by name (a module-level function) and its result
    picklable. Process groups are torn down after ``fn`` returns.
    """
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_child,
            args=(rank, world_size, port, fn, args, dict(env or {}), results),
            daemon=False,
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    collected: dict[int, Any] = {}
    try:
        while len(collected) < world_size:
            try:
                rank, ok, value = results.get(timeout=timeout)
            except queue.Empty:
                missing = sorted(set(range(world_size)) - set(collected))
                raise RankFailure(
                    f"ranks {missing} of {world_size} gave no result within {timeout:.0f}s"
                ) from None
            if not ok:
                raise RankFailure(f"rank {rank} of {world_size} failed:\n{value}")
            collected[rank] = pickle.loads(value)
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.join()
    return [collected[rank] for rank in range(world_size)]


# --------------------------------------------------------------------------- peak memory
