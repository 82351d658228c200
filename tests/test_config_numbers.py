"""Optimizer numbers that cannot train are refused by name (issue 14, item 13)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megarm.config import ConfigError
from megarm.preflight import resolve

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optimizer.lr=nan", "optimizer.lr: must be a finite number, got nan"),
        ("optimizer.lr=inf", "optimizer.lr: must be a finite number, got inf"),
        ("optimizer.lr=-1e-3", "optimizer.lr: must be >= 0, got -0.001"),
        ("optimizer.min_lr=-1e-6", "optimizer.min_lr: must be >= 0"),
        ("optimizer.min_lr=.nan", "optimizer.min_lr: must be a finite number"),
        ("optimizer.weight_decay=-0.1", "optimizer.weight_decay: must be >= 0"),
        ("optimizer.weight_decay=inf", "optimizer.weight_decay: must be a finite number"),
        ("optimizer.clip_grad=nan", "optimizer.clip_grad: must be a finite number"),
        ("optimizer.adam_eps=0", "optimizer.adam_eps: must be > 0"),
        ("optimizer.adam_beta2=1.0", "optimizer.adam_beta2: must be within [0, 1)"),
    ],
)
def test_non_finite_or_negative_optimizer_values_are_refused(override, message):
    with pytest.raises(ConfigError) as caught:
        resolve(None, [override])
    assert message in str(caught.value)
    assert len(caught.value.issues) == 1, caught.value  # named once, no knock-on errors


def test_the_validator_command_prints_one_line_per_problem():
    done = subprocess.run(
        [sys.executable, "-m", "megarm.config", "optimizer.lr=nan", "optimizer.weight_decay=-1"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "optimizer.lr: must be a finite number, got nan" in done.stderr
    assert "optimizer.weight_decay: must be >= 0, got -1.0" in done.stderr
