"""``source tools/setup_env.sh`` leaves the caller's shell options and shell alone."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = ("errexit", "nounset", "pipefail")


def _fake_env(tmp_path: Path, *, ready: bool) -> dict[str, str]:
    """A venv whose stamp is up to date (nothing to install), or none and a python
    that fails (the install fails); nvidia-smi absent so the stamp reads "cpu"."""
    venv = tmp_path / "venv"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    if ready:
        (venv / "bin").mkdir(parents=True)
        shutil.copy("/bin/true", venv / "bin" / "python")
        digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
        (venv / ".megarm-installed").write_text(f"{digest}-cpu\n")
    env = dict(os.environ, MEGARM_VENV=str(venv), PYTHON="/bin/false")
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    return env


def _shell(script: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


def _options(stdout: str) -> dict[str, str]:
    """The caller's errexit/nounset/pipefail as ``set -o`` printed them."""
    rows = [line.split() for line in stdout.splitlines()]
    return {row[0]: row[1] for row in rows if len(row) == 2 and row[0] in OPTIONS}


@pytest.mark.parametrize("before", ["off", "on"])
def test_sourcing_keeps_the_callers_options(tmp_path, before):
    env = _fake_env(tmp_path, ready=True)
    setup = "set -euo pipefail" if before == "on" else "set +euo pipefail"
    done = _shell(f'{setup}; source tools/setup_env.sh; set -o; echo "PY=$MEGARM_PY"', env)
    assert done.returncode == 0, done.stderr
    assert _options(done.stdout) == dict.fromkeys(OPTIONS, before)
    assert f"PY={env['MEGARM_VENV']}/bin/python" in done.stdout
    assert "environment up to date" in done.stderr


def test_a_failed_install_returns_and_keeps_the_callers_shell(tmp_path):
    env = _fake_env(tmp_path, ready=False)
    done = _shell('set +euo pipefail; source tools/setup_env.sh; echo "rc=$?"; set -o', env)
    assert "rc=1" in done.stdout, done.stdout + done.stderr
    assert _options(done.stdout) == dict.fromkeys(OPTIONS, "off")
