"""Kill a 2-rank torchrun training run ten times at random points (SIGKILL of a rank
or of the launcher, during a save or between saves) and resume each time: no
process survives 10 s past the kill, the tracker always names a checkpoint that
verifies and loads, and every iteration's loss equals the uninterrupted run's bit
for bit (issue 14)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from megarm.testing import free_port

ROOT = Path(__file__).resolve().parents[1]
ITERS = 12
RUN = [
    "--config", str(ROOT / "configs/orm_trainer_tiny.yaml"),
    f"training.train_iters={ITERS}", "training.global_batch_size=8", "training.micro_batch_size=2",
    "training.eval_interval=0", "training.log_interval=1", "data.synthetic_num_pairs=256",
    "data.split=100,0,0", "checkpoint.save_interval=1", "logging.tensorboard=false",
]


def _start(log_dir: Path, ckpt: Path) -> subprocess.Popen:
    resume = [f"checkpoint.load={ckpt}"] if (ckpt / "latest_checkpointed_iteration.txt").is_file() else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), "-m", "megarm.train", *RUN,
           f"checkpoint.save={ckpt}", f"logging.log_dir={log_dir}", *resume]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _losses(log_dir: Path) -> dict[int, list[float]]:
    """Every logged training loss by iteration (a redone iteration appears twice)."""
    out: dict[int, list[float]] = {}
    path = log_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut by the kill
            if row.get("split") == "train":
                out.setdefault(row["iteration"], []).append(row["loss"])
    return out


def _tree(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        root = psutil.Process(proc.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def _verify(ckpt: Path) -> int:
    from megarm.checkpoint import open_checkpoint

    opened = open_checkpoint(ckpt)  # sizes, checksums, safe pickles, common.pt
    return int(opened.common["iteration"])


@pytest.mark.slow
def test_random_kills_never_lose_or_change_the_run(tmp_path):
    reference = _start(tmp_path / "ref_log", tmp_path / "ref_ckpt")
    assert reference.wait(timeout=600) == 0
    expected = {i: v[0] for i, v in _losses(tmp_path / "ref_log").items()}
    assert sorted(expected) == list(range(1, ITERS + 1))

    rng = random.Random(14)
    log_dir, ckpt = tmp_path / "log", tmp_path / "ckpt"
    kills = []
    for trial in range(10):
        proc = _start(log_dir, ckpt)
        target = rng.choice(["launcher", "rank"])
        moment = rng.choice(["during save", "between saves"])
        deadline = time.time() + 120
        killed = None
        while time.time() < deadline and proc.poll() is None:
            tree = _tree(proc)
            workers = tree[1:]
            saving = bool(list(ckpt.glob("iter_*.tmp"))) if ckpt.is_dir() else False
            started = (log_dir / "metrics.jsonl").is_file() and len(workers) >= 2
            if started and (saving if moment == "during save" else rng.random() < 0.02):
                victim = tree[0] if target == "launcher" else rng.choice(workers)
                victim.send_signal(signal.SIGKILL)
                killed = tree
                break
            time.sleep(0.002 if moment == "during save" else 0.05)
        if killed is None:  # the run ended first (it was near its end): fine, no kill
            proc.wait(timeout=60)
            kills.append((trial, "none", moment))
        else:
            kills.append((trial, target, moment))
            end = time.time() + 10
            while time.time() < end and _alive(killed):
                time.sleep(0.1)
            survivors = _alive(killed)
            assert not survivors, f"trial {trial} ({target}, {moment}): {survivors} outlived the kill"
            proc.wait(timeout=5)
        if (ckpt / "latest_checkpointed_iteration.txt").is_file():
            named = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
            assert _verify(ckpt) == named
    final = _start(log_dir, ckpt)
    assert final.wait(timeout=600) == 0, kills
    assert _verify(ckpt) == ITERS
    for iteration, losses in _losses(log_dir).items():
        for loss in losses:  # iterations redone after a kill included
            assert loss == expected[iteration], (iteration, loss, expected[iteration], kills)
    assert sorted(_losses(log_dir)) == list(range(1, ITERS + 1))
    assert any(k[1] != "none" for k in kills)
