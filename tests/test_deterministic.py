"""training.deterministic (megarm/platform): strict deterministic mode on CUDA, where
warn-only would still run non-deterministic kernels; warn-only on CPU."""

from __future__ import annotations

import pytest
import torch

from megarm import platform


@pytest.fixture
def restore(monkeypatch):
    """Undo the process-wide flags a test sets."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]


def test_settings_per_device_kind():
    assert platform.deterministic_settings(False, cuda=True) is None
    assert platform.deterministic_settings(False, cuda=False) is None
    assert platform.deterministic_settings(True, cuda=True) == platform.DeterministicSettings(
        warn_only=False, cublas_workspace=":4096:8", cudnn_deterministic=True)
    assert platform.deterministic_settings(True, cuda=False) == platform.DeterministicSettings(
        warn_only=True, cublas_workspace=None, cudnn_deterministic=False)


def test_cuda_settings_are_strict_when_applied(restore):
    import os

    torch.backends.cudnn.benchmark = True
    platform.set_deterministic(True, cuda=True)
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.is_deterministic_algorithms_warn_only_enabled()  # was warn_only=True
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark


def test_cpu_settings_warn_only_and_keep_the_environment(restore, monkeypatch):
    import os

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    platform.set_deterministic(True, cuda=False)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    torch.use_deterministic_algorithms(False)
    assert platform.set_deterministic(False) is None
    assert not torch.are_deterministic_algorithms_enabled()


def test_the_config_flag_reaches_it(restore, monkeypatch):
    """distributed.init_from_config applies training.deterministic for this device."""
    from megarm import distributed
    from megarm.config import load_config

    seen = []
    monkeypatch.setattr(platform, "set_deterministic", lambda enabled: seen.append(enabled))
    monkeypatch.setattr(distributed, "init", lambda *a, **k: None)
    distributed.init_from_config(load_config(None, ["training.deterministic=true"]))
    assert seen == [True]
