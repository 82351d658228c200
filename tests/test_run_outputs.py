"""Run outputs and stop conditions: SIGTERM saves and exits, keep_last, plots."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=64",
    "model.num_attention_heads=4", "model.num_query_groups=2", "model.vocab_size=256",
    "model.max_position_embeddings=64", "data.seq_length=24", "data.synthetic_num_pairs=200",
    "data.split=80,20,0", "training.micro_batch_size=2", "training.global_batch_size=4",
    "optimizer.lr=1e-3",
]


def _train(*overrides: str, **popen) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "megarm.train", *TINY, *overrides], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        **popen,
    )


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path):
    ckpt, logs = tmp_path / "ckpt", tmp_path / "logs"
    proc = _train("training.train_iters=100000", f"checkpoint.save={ckpt}",
                  f"logging.log_dir={logs}", "training.log_interval=1")
    deadline = time.time() + 240
    while time.time() < deadline and not (logs / "metrics.jsonl").is_file():
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    latest = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert 0 < latest < 100000 and (ckpt / f"iter_{latest:07d}").is_dir()
    assert "exiting at iteration" in out


def test_keep_last_eval_rewards_and_plots(tmp_path):
    ckpt, logs = tmp_path / "ckpt", tmp_path / "logs"
    proc = _train("training.train_iters=6", "training.eval_interval=3", "training.eval_iters=2",
                  f"checkpoint.save={ckpt}", "checkpoint.save_interval=2",
                  "checkpoint.keep_last=2", f"logging.log_dir={logs}")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert sorted(p.name for p in ckpt.glob("iter_*")) == ["iter_0000004", "iter_0000006"]
    evals = [json.loads(x) for x in (logs / "eval_rewards.jsonl").read_text().splitlines()]
    assert [e["iteration"] for e in evals] == [3, 6]
    # 40 validation pairs, 2 eval iterations of 4 pairs: 8 rewards each side.
    assert len(evals[-1]["chosen"]) == len(evals[-1]["rejected"]) == 8
    records = [json.loads(x) for x in (logs / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "accuracy", "chosen_reward", "chosen_reward_std", "rejected_reward",
                "rejected_reward_std", "reward_gap", "grad_norm", "lr", "tokens_per_s",
                "samples_per_s", "iteration_time"):
        assert key in records[0], key
    assert (logs / "config.yaml").is_file() and list((logs / "tensorboard").glob("events.*"))
    done = subprocess.run([sys.executable, "tools/plot_metrics.py", str(logs)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for name in ("curves.png", "rewards_hist.png"):
        data = (logs / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
