"""Where a config's values come from and what a real-size run must name: YAML vs
``model.hf_config`` conflicts, the command line winning with a note, the start of a
100M+ parameter model (data and weights), and the optional W&B dependency."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from megarm.config import ConfigError, approx_parameters, load_config
from megarm.preflight import resolve

ROOT = Path(__file__).resolve().parents[1]
HALF_B = ROOT / "configs" / "orm_trainer_qwen25_0.5b.yaml"

# Qwen2.5-0.5B's published config.json (the keys megarm reads).
QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
    "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
    "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
    "rope_theta": 1000000.0, "rms_norm_eps": 1e-06, "tie_word_embeddings": True,
}


def hf_dir(tmp_path: Path, **changes) -> Path:
    """A config.json: Qwen2.5-0.5B's with ``changes`` (a None value drops the key)."""
    path = tmp_path / "hf"
    path.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in {**QWEN25_05B, **changes}.items() if v is not None}
    (path / "config.json").write_text(json.dumps(config))
    return path


def issues(path, overrides, world_size=None):
    try:
        resolve(path, overrides, world_size)
    except ConfigError as exc:
        return exc.issues
    return []


START = ["data.allow_synthetic=true", "checkpoint.allow_random_init=true"]


# --------------------------------------------------------------------------- hf_config


def test_shipped_yaml_agrees_with_the_real_hf_config(tmp_path):
    cfg = resolve(HALF_B, [f"model.hf_config={hf_dir(tmp_path)}", *START], 8)
    assert cfg.model.rotary_base == 1e6 and cfg.model.num_layers == 24


def test_yaml_shape_key_that_disagrees_with_hf_config_is_refused(tmp_path):
    # The bug: a checkpoint with rope_theta 10000 trained and exported as 1e6.
    hf = hf_dir(tmp_path, rope_theta=10000.0)
    found = issues(HALF_B, [f"model.hf_config={hf}", *START], 8)
    assert [i.key for i in found] == ["model.rotary_base"]
    message = found[0].message
    assert str(HALF_B) in message and "1000000.0" in message
    assert "rope_theta=10000.0" in message and str(hf / "config.json") in message
    # transformers 5 writes it under rope_parameters only: the same conflict.
    hf5 = hf_dir(tmp_path / "v5", rope_theta=None,
                 rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})
    found = issues(HALF_B, [f"model.hf_config={hf5}", *START], 8)
    assert [i.key for i in found] == ["model.rotary_base"]


def test_every_disagreeing_key_is_named(tmp_path):
    hf = hf_dir(tmp_path, num_hidden_layers=12, max_position_embeddings=131072)
    found = issues(HALF_B, [f"model.hf_config={hf}", *START], 8)
    assert sorted(i.key for i in found) == ["model.max_position_embeddings", "model.num_layers"]


def test_command_line_wins_over_hf_config_and_says_so(tmp_path, capsys, monkeypatch):
    hf = hf_dir(tmp_path, rope_theta=10000.0)
    monkeypatch.delenv("RANK", raising=False)
    cfg = resolve(HALF_B, [f"model.hf_config={hf}", "model.rotary_base=10000", *START], 8)
    assert cfg.model.rotary_base == 10000.0
    err = capsys.readouterr().err
    assert "model.rotary_base=10000.0 from the command line overrides rope_theta=10000.0" not in err
    # The command line against config.json's own value: the note names both.
    cfg = resolve(HALF_B, [f"model.hf_config={hf}", "model.rotary_base=500000", *START], 8)
    assert cfg.model.rotary_base == 500000.0
    err = capsys.readouterr().err
    assert "model.rotary_base=500000.0 from the command line overrides rope_theta=10000.0" in err
    # Under torchrun only rank 0 says it.
    monkeypatch.setenv("RANK", "1")
    resolve(HALF_B, [f"model.hf_config={hf}", "model.rotary_base=500000", *START], 8)
    assert capsys.readouterr().err == ""


def test_keys_the_yaml_leaves_out_still_come_from_hf_config(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("model:\n  kv_channels: null\n  params_dtype: fp32\n")
    hf = hf_dir(tmp_path, head_dim=128)
    cfg = load_config(path, [f"model.hf_config={hf}"])
    assert cfg.model.kv_channels == 128 and cfg.model.hidden_size == 896


# --------------------------------------------------------------------------- real-size start


@pytest.mark.parametrize("size", ["0.5b", "7b", "72b"])
def test_real_model_without_data_or_weights_is_refused(size):
    path = ROOT / "configs" / f"orm_trainer_qwen25_{size}.yaml"
    gpus = {"0.5b": 8, "7b": 8, "72b": 64}[size]
    found = {i.key: i.message for i in issues(path, [], gpus)}
    assert sorted(found) == ["checkpoint.load", "data.data_path"]
    assert "--output-prefix of tools/preprocess_data.py" in found["data.data_path"]
    assert "data.allow_synthetic=true" in found["data.data_path"]
    assert "ckpt_convert/hf2mcore.py" in found["checkpoint.load"]
    assert "checkpoint.allow_random_init=true" in found["checkpoint.load"]
    # Each opt-in answers its own problem.
    only_load = issues(path, ["data.allow_synthetic=true"], gpus)
    assert [i.key for i in only_load] == ["checkpoint.load"]
    assert issues(path, START, gpus) == []


def test_small_models_may_use_synthetic_pairs_and_random_weights():
    for name, world in [("orm_trainer_tiny.yaml", 2), ("orm_trainer_demo.yaml", 2)]:
        assert issues(ROOT / "configs" / name, [], world) == []
    cfg = load_config(HALF_B)
    assert approx_parameters(cfg.model) > 100_000_000  # the 0.5B is "real"
    # Qwen2.5-0.5B without its (tied) LM head: 494M - 0 (tied) = 494M parameters.
    assert abs(approx_parameters(cfg.model) - 494_032_768) / 494_032_768 < 0.002


# --------------------------------------------------------------------------- W&B


def test_wandb_requested_but_not_installed_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # find_spec then answers None
    found = issues(None, ["logging.wandb_project=rm"])
    assert [i.key for i in found] == ["logging.wandb_project"]
    assert "pip install 'megarm[wandb]'" in found[0].message


def test_wandb_settings_without_a_project_are_named():
    found = issues(None, ["logging.wandb_name=run1", "logging.wandb_mode=offline"])
    assert sorted(i.key for i in found) == ["logging.wandb_mode", "logging.wandb_name"]
