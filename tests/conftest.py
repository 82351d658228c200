"""Session fixtures shared by the scoring, serving and evaluation tests.

``rm_export`` is a tiny random ``Qwen2ForSequenceClassification`` with the real Qwen2.5
vocabulary and tokenizer (a stand-in for an exported reward model, or any third-party
HF reward model); ``rm_checkpoint`` is the same weights converted to a megarm
torch_dist checkpoint by ``ckpt_convert/hf2mcore.py``. Both are built once per session.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PAD_ID = 151643  # Qwen2.5's <|endoftext|>


def build_reward_model(
    out: Path, tokenizer_dir: Path, seed: int = 3, max_positions: int = 256
) -> Path:
    """A random reward model whose weights are all perturbed (a misplaced tensor or a
    reward read one token off shows), saved with the tokenizer files."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForSequenceClassification

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=151936,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        pad_token_id=PAD_ID,
        num_labels=1,
    )
    model = Qwen2ForSequenceClassification(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=gen)
            scale = 1.0 if name == "score.weight" else 0.1
            param.copy_(1.0 + 0.2 * noise if "norm" in name else scale * noise)
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def rm_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Qwen2.5-compatible tokenizer directory, built offline."""
    from megarm.data.tokenizer import build_qwen25_tokenizer

    return build_qwen25_tokenizer(tmp_path_factory.mktemp("rm_tokenizer"))


@pytest.fixture(scope="session")
def rm_export(rm_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An HF reward model directory (config.json, safetensors, tokenizer)."""
    return build_reward_model(tmp_path_factory.mktemp("rm") / "export", rm_tokenizer)


@pytest.fixture(scope="session")
def rm_checkpoint(rm_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``rm_export`` converted to a megarm torch_dist checkpoint (tokenizer copied)."""
    return convert_to_mcore(rm_export, tmp_path_factory.mktemp("rm_mcore") / "mcore")


def convert_to_mcore(export: Path, out: Path) -> Path:
    """An HF reward model converted by ``ckpt_convert/hf2mcore.py`` (fp32)."""
    # Keep what PYTHONPATH already holds (tools/gpu_check.sh puts megatron-core there).
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    done = subprocess.run(
        [sys.executable, str(REPO / "ckpt_convert" / "hf2mcore.py"), "--load-dir", str(export),
         "--save-dir", str(out), "--params-dtype", "fp32", "--tokenizer-model", str(export)],
        capture_output=True, text=True, env=env, cwd=str(REPO), timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out
