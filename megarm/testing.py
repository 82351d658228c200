"""Run code the way tests and benchmarks need: on N gloo ranks, or measured.

:func:`run_distributed` runs a function on N ranks and collects each rank's result:
every rank is a spawned process with torchrun's environment variables set, so code
under test sees exactly what ``torchrun`` would give it. A failure on any rank
raises in the caller with that rank's traceback; a hang raises after ``timeout``
seconds. :func:`measure_peak_rss` runs a script in a fresh interpreter and reports
its own peak memory (the converters' memory tests and benchmark).
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


def peak_rss_bytes() -> int:
    """This process's peak resident memory since it started (or last exec'd).

    Linux's ``VmHWM`` belongs to the process's own address space. ``ru_maxrss``
    (the fallback elsewhere) also counts the image of the parent that forked it,
    so a small tool launched from a large process would report the parent's size.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


_PEAK_MARK = "MEGARM_PEAK_RSS_BYTES="
_PEAK_WRAPPER = f"""
import atexit, runpy, sys
from megarm.testing import peak_rss_bytes
atexit.register(lambda: print("{_PEAK_MARK}%d" % peak_rss_bytes(), file=sys.stderr, flush=True))
sys.argv = sys.argv[1:]
if sys.argv[0] == "-c":
    exec(compile(sys.argv[1], "<string>", "exec"), {{"__name__": "__main__"}})
else:
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


def measure_peak_rss(
    argv: list[str], env: dict[str, str] | None = None, timeout: float | None = None
) -> tuple[int, float, str]:
    """Run the Python script ``argv`` (``[script, args...]`` or ``["-c", code]``) in a
    fresh interpreter; return (its peak RSS in bytes, wall seconds, its output).

    Raises ``RuntimeError`` with the output's tail when it exits non-zero.
    """
    import subprocess
    import sys
    import time

    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK_WRAPPER, *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    wall = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)[:200]} exited {proc.returncode}:\n{output[-3000:]}")
    peaks = [line for line in proc.stderr.splitlines() if line.startswith(_PEAK_MARK)]
    if not peaks:
        raise RuntimeError(f"{argv[0]} did not report its peak memory:\n{output[-2000:]}")
    return int(peaks[-1].removeprefix(_PEAK_MARK)), wall, output
