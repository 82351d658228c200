"""Processes and the machine (issue 14 items 9-11, 13): what megarm starts opens no
port it does not need and does not outlive its run."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A world of one: report every listening TCP socket this process holds (from /proc).
_LISTENERS = r"""
import os
from megarm import distributed
distributed.init(1, 1)
inodes = set()
for fd in os.listdir("/proc/self/fd"):
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        continue
    if target.startswith("socket:["):
        inodes.add(target[8:-1])
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    with open(table) as fh:
        for line in list(fh)[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                print("LISTEN", fields[1])
distributed.teardown()
print("DONE")
"""


def test_a_world_of_one_opens_no_store_on_any_interface():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "GLOO_SOCKET_IFNAME")}
    env.update(OMP_NUM_THREADS="1", MASTER_PORT="54999")  # what the converters used to set
    done = subprocess.run([sys.executable, "-c", _LISTENERS], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert "DONE" in done.stdout, done.stderr[-3000:]
    addresses = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("LISTEN")]
    # address:port in hex; an all-zero address is 0.0.0.0 / :: (every interface).
    wildcard = [a for a in addresses if set(a.split(":")[0]) == {"0"}]
    assert wildcard == [], f"listening on every interface: {wildcard}"
    assert not any(a.endswith(f":{54999:04X}") for a in addresses)  # no store at MASTER_PORT


def test_converters_do_not_pick_ports():
    for name in ("hf2mcore.py", "mcore2hf.py"):
        text = (ROOT / "ckpt_convert" / name).read_text()
        assert "free_port" not in text and "MASTER_PORT" not in text, name


def _gone_within(pids: list[int], seconds: float) -> list[int]:
    """The pids still running (zombies count as gone) after up to ``seconds``."""
    import psutil

    deadline = time.time() + seconds
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.2)


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# A rank as megarm sets it up, then megatron-core's checkpoint writer asks for its
# results queue (the ~270 MB Manager server and the resource tracker it brings).
_RANK_WITH_WRITER_QUEUE = r"""
import time, psutil
from megarm import distributed
from megatron.core.dist_checkpointing.strategies import filesystem_async
distributed.init(1, 1)
filesystem_async._get_write_results_queue()
print("CHILDREN", *[p.pid for p in psutil.Process().children(recursive=True)], flush=True)
time.sleep(600)
"""


def test_the_checkpoint_writers_manager_dies_with_its_rank():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", _RANK_WITH_WRITER_QUEUE], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    children: list[int] = []
    try:
        line = proc.stdout.readline()
        assert line.startswith("CHILDREN"), line
        children = [int(pid) for pid in line.split()[1:]]
        assert len(children) >= 2  # the Manager server and the resource tracker
        proc.kill()
        proc.wait()
        assert _gone_within(children, 10) == []
    finally:
        _kill_all([proc.pid, *children])


@pytest.mark.slow
def test_workers_exit_when_torchrun_is_killed(tmp_path):
    from megarm.testing import free_port

    logs = tmp_path / "logs"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(free_port()), "-m", "megarm.train",
        "model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=64",
        "model.num_attention_heads=4", "model.num_query_groups=2", "model.vocab_size=256",
        "model.max_position_embeddings=64", "data.seq_length=24", "data.synthetic_num_pairs=200",
        "training.micro_batch_size=2", "training.global_batch_size=4",
        "training.train_iters=1000000", f"logging.log_dir={logs}", "logging.tensorboard=false",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    workers: list[int] = []
    try:
        import psutil

        deadline = time.time() + 240
        while time.time() < deadline and not (
            (logs / "metrics.jsonl").is_file() and (logs / "metrics.jsonl").read_text().count("\n") >= 2
        ):
            assert launcher.poll() is None, "training stopped by itself"
            time.sleep(0.5)
        workers = [p.pid for p in psutil.Process(launcher.pid).children(recursive=True)]
        assert len(workers) >= 2, workers
        launcher.kill()  # SIGKILL: torchrun runs no cleanup
        launcher.wait()
        assert _gone_within(workers, 10) == [], "workers outlived their launcher"
    finally:
        _kill_all([launcher.pid, *workers])
