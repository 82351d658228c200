"""Hostile configs get one clear error, quickly (issue #25): YAML aliases, duplicate
keys, a zero world size, a negative eval_iters."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from megarm.config import ConfigError, load_config
from megarm.preflight import resolve

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_an_alias_bomb_is_refused_at_once(tmp_path):
    # Nine levels of 10-element aliases: 10^9 leaves once expanded (it hung at 4 GB).
    lines = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    lines.append("optimizer:\n  lr: *a9")
    path = _write(tmp_path, "\n".join(lines) + "\n")
    assert path.stat().st_size < 1200
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="aliases"):
        load_config(path)
    assert time.perf_counter() - started < 2.0


def test_a_duplicate_section_names_both_lines(tmp_path):
    path = _write(tmp_path, "training:\n  micro_batch_size: 4\n  global_batch_size: 8\n"
                            "optimizer:\n  lr: 1.0e-5\ntraining:\n  train_iters: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "'training' is given twice (lines 1 and 6)" in str(info.value)


def test_a_duplicate_key_inside_a_section_is_refused(tmp_path):
    path = _write(tmp_path, "optimizer:\n  lr: 1.0e-5\n  lr: 2.0e-5\n")
    with pytest.raises(ConfigError, match="'lr' is given twice"):
        load_config(path)


def test_a_plain_config_still_loads(tmp_path):
    path = _write(tmp_path, "optimizer:\n  lr: 2.0e-5\ntraining:\n  train_iters: 3\n")
    cfg = load_config(path)
    assert cfg.optimizer.lr == 2.0e-5 and cfg.training.train_iters == 3


def test_world_size_zero_is_one_error_line():
    done = subprocess.run(
        [sys.executable, "-m", "megarm.config", "--world-size", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "--world-size: must be >= 1, got 0" in done.stderr
    assert "Traceback" not in done.stderr


def test_negative_eval_iters_is_refused():
    with pytest.raises(ConfigError, match="training.eval_iters: must be >= 0"):
        resolve(None, ["training.eval_iters=-1"])


def test_every_bad_value_is_reported_in_one_run():
    # Issue #25: of nine bad values one run named three; a zero count hid the rest
    # (lr, beta1, clip_grad, keep_last came only on a later run).
    bad = {
        "training.micro_batch_size": "0",
        "data.seq_length": "0",
        "optimizer.lr": "-1",
        "optimizer.adam_beta1": "1.5",
        "optimizer.adam_eps": "0",
        "optimizer.clip_grad": "-1",
        "model.hidden_dropout": "2",
        "training.eval_iters": "-1",
        "checkpoint.keep_last": "0",
    }
    with pytest.raises(ConfigError) as caught:
        resolve(None, [f"{k}={v}" for k, v in bad.items()], world_size=1)
    assert sorted(issue.key for issue in caught.value.issues) == sorted(bad)


def test_a_bad_config_is_one_error_line_then_its_problems(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "megarm.config", "training.eval_iters=-1", "optimizer.lr=-1"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )
    assert done.returncode == 2
    first, *rest = done.stderr.strip().splitlines()
    assert first.startswith("error: invalid megarm config (2 problem(s))")
    assert "Traceback" not in done.stderr
    assert any("training.eval_iters: must be >= 0" in line for line in rest)
