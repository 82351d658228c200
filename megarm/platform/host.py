"""Facts about a host process that differ between operating systems: its peak
resident memory, read in this process (the converters report it) or measured for a
script run in a fresh interpreter (the converters' memory test and benchmark).

Imports no torch itself (``megarm.platform``, the package, does)."""

from __future__ import annotations

import resource
import subprocess
import sys
import time


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
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


_PEAK_MARK = "MEGARM_PEAK_RSS_BYTES="
_PEAK_WRAPPER = f"""
import atexit, runpy, sys
from megarm.platform.host import peak_rss_bytes
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

    The interpreter imports ``megarm.platform`` (and with it torch) before the
    script, so compare peaks with a baseline measured the same way. Raises
    ``RuntimeError`` with the output's tail when it exits non-zero.
    """
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
