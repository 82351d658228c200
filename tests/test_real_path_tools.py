"""The command lines that let a user try the real path offline: a random HF
checkpoint with a config's exact shape (ckpt_convert/random_qwen2.py), the offline
Qwen2.5 tokenizer (python -m megarm.data.tokenizer), and hf2mcore saying on its
first line that it rounds fp32 weights."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megarm.config import load_config

ROOT = Path(__file__).resolve().parents[1]

# Distinctive values: each must reach config.json (a theta left at a default shows).
SMALL = """\
model:
  num_layers: 1
  hidden_size: 16
  ffn_hidden_size: 32
  num_attention_heads: 2
  num_query_groups: 1
  vocab_size: 151936
  max_position_embeddings: 96
  rotary_base: 500000.0
  norm_epsilon: 1.0e-5
  tie_word_embeddings: true
"""


@pytest.fixture(scope="module")
def small_hf(tmp_path_factory) -> tuple[Path, Path]:
    """(config yaml, HF dir written by random_qwen2.py --config ... --no-tokenizer)."""
    from ckpt_convert import random_qwen2

    work = tmp_path_factory.mktemp("real_path")
    config = work / "small.yaml"
    config.write_text(SMALL)
    out = work / "hf"
    assert random_qwen2.main(["--config", str(config), "--save-dir", str(out),
                              "--no-tokenizer"]) == 0
    return config, out


def test_random_checkpoint_has_the_configs_exact_shape(small_hf):
    from safetensors import safe_open
    from transformers import AutoConfig

    config, out = small_hf
    hf = AutoConfig.from_pretrained(out)  # transformers' own reading of config.json
    theta = getattr(hf, "rope_theta", None) or hf.rope_parameters["rope_theta"]
    assert theta == 500000.0 and hf.rms_norm_eps == 1e-5
    assert hf.max_position_embeddings == 96 and hf.tie_word_embeddings is True
    assert (hf.num_hidden_layers, hf.hidden_size, hf.intermediate_size) == (1, 16, 32)
    assert (hf.num_attention_heads, hf.num_key_value_heads, hf.vocab_size) == (2, 1, 151936)
    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        assert "lm_head.weight" not in weights.keys()  # tied
        assert weights.get_slice("model.embed_tokens.weight").get_shape() == [151936, 16]
    # megarm reads it back without a single conflict with the YAML it came from.
    cfg = load_config(config, [f"model.hf_config={out}"])
    assert cfg.model.rotary_base == 500000.0 and cfg.model.norm_epsilon == 1e-5


def test_shapes_are_the_shipped_configs():
    from ckpt_convert.random_qwen2 import shipped_shapes

    shapes = shipped_shapes()
    assert sorted(shapes) == sorted(
        f"qwen2.5-{s}" for s in ("0.5b", "1.5b", "3b", "7b", "14b", "32b", "72b")
    )
    assert shapes["qwen2.5-0.5b"] == ROOT / "configs" / "orm_trainer_qwen25_0.5b.yaml"


def test_random_checkpoint_refuses_a_vocab_the_tokenizer_does_not_fit(tmp_path, capsys):
    from ckpt_convert import random_qwen2

    code = random_qwen2.main(["--config", str(ROOT / "configs/orm_trainer_tiny.yaml"),
                              "--save-dir", str(tmp_path / "out")])
    assert code == 2 and "pass --no-tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_tokenizer_command_writes_beside_the_weights(small_hf):
    from transformers import AutoTokenizer

    from megarm.data import tokenizer

    _, out = small_hf
    assert tokenizer.main(["--save-dir", str(out)]) == 0
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids("<|im_end|>") == 151645 and tok.pad_token == "<|endoftext|>"
    assert tok("Hello world")["input_ids"] == [9707, 1879]  # Qwen2.5's ids
    assert (out / "model.safetensors").is_file()  # the weights are untouched


def test_hf2mcore_says_first_that_it_rounds_fp32_weights(small_hf, tmp_path, capsys, caplog):
    from ckpt_convert import hf2mcore

    _, hf = small_hf
    # TP=2 cannot split 1 KV head: the converter stops before reading any weight,
    # after the line about the dtype.
    common = ["--load-dir", str(hf), "--save-dir", str(tmp_path / "out"),
              "--target-tensor-parallel-size", "2"]
    done = subprocess.run([sys.executable, "ckpt_convert/hf2mcore.py", *common],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    # Python warnings from libraries (file:line: ...Warning: and the source line) aside.
    lines = re.sub(r"^\S+:\d+: \w*Warning: .*\n(?:[ \t]+.*\n)?", "", done.stderr, flags=re.M)
    first = lines.splitlines()[0]
    assert first.startswith(f"hf2mcore: rounding the fp32 weights of {hf} to bf16"), first
    assert "--params-dtype fp32" in first
    # Kept in fp32: nothing to say.
    assert hf2mcore.main([*common, "--params-dtype", "fp32"]) == 2
    assert "tensor-parallel size 2" in capsys.readouterr().err
    assert not [r for r in caplog.records if "weights of" in r.getMessage()]


def test_stored_dtype_falls_back_to_the_safetensors_header(small_hf, tmp_path):
    from ckpt_convert.hf2mcore import stored_dtype

    _, hf = small_hf
    config = json.loads((hf / "config.json").read_text())
    assert config.pop("dtype") == "float32"
    assert stored_dtype(hf, config) == "fp32"  # read from model.safetensors' header
    assert stored_dtype(tmp_path, {}) is None
