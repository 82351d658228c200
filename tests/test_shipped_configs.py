"""Every shipped config validates at its intended world size; the launchers run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megarm.config import load_config, padded_vocab_size, resolve
from megarm.testing import free_port

ROOT = Path(__file__).resolve().parents[1]
QWEN = sorted(ROOT.glob("configs/orm_trainer_qwen25_*.yaml"))

# Qwen2.5 shapes from the published config.json files:
# (layers, hidden, intermediate, heads, kv heads, vocab).
REAL = {
    "0.5b": (24, 896, 4864, 14, 2, 151936),
    "1.5b": (28, 1536, 8960, 12, 2, 151936),
    "3b": (36, 2048, 11008, 16, 2, 151936),
    "7b": (28, 3584, 18944, 28, 4, 152064),
    "14b": (48, 5120, 13824, 40, 8, 152064),
    "32b": (64, 5120, 27648, 40, 8, 152064),
    "72b": (80, 8192, 29568, 64, 8, 152064),
}


def intended_world_size(path: Path) -> int:
    match = re.search(r"^# gpus: (\d+)$", path.read_text(), re.M)
    assert match, f"{path.name} must state its GPUs as '# gpus: N'"
    return int(match.group(1))


def test_all_sizes_are_shipped():
    assert sorted(p.stem.rsplit("_", 1)[1] for p in QWEN) == sorted(REAL)


@pytest.mark.parametrize("path", QWEN, ids=lambda p: p.stem)
def test_qwen_config_validates_with_real_shapes(path):
    cfg = resolve(path, [], intended_world_size(path))
    m = cfg.model
    size = path.stem.rsplit("_", 1)[1]
    got = (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads,
           m.num_query_groups, m.vocab_size)
    assert got == REAL[size]
    assert padded_vocab_size(m) == m.vocab_size  # Qwen's vocab needs no padding
    assert m.rotary_base == 1e6 and m.norm_epsilon == 1e-6 and m.add_qkv_bias


def test_tiny_config_validates():
    resolve(ROOT / "configs/orm_trainer_tiny.yaml", [], 2)


TINY_OVERRIDES = [
    "model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=64",
    "model.num_attention_heads=4", "model.num_query_groups=2", "model.vocab_size=256",
    "model.max_position_embeddings=64", "model.params_dtype=fp32",
    "parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=1",
    "data.seq_length=32", "data.synthetic_num_pairs=64", "training.micro_batch_size=1",
    "training.global_batch_size=2", "training.train_iters=2", "checkpoint.save=null",
    "checkpoint.save_interval=null", "data.tokenizer_name_or_path=null",
]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["orm_trainer_qwen25_7b.sh", "orm_trainer_qwen25_32b.sh"])
def test_launcher_runs_on_cpu_with_tiny_overrides(script, tmp_path):
    env = dict(os.environ, GPUS_PER_NODE="2", NNODES="1", NODE_RANK="0",
               MASTER_PORT=str(free_port()), PYTHON=sys.executable)
    done = subprocess.run(
        ["bash", str(ROOT / "examples/rm" / script), *TINY_OVERRIDES,
         f"logging.log_dir={tmp_path}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if r["split"] == "train"] == [1, 2]
    # The overrides reached the config the run used.
    used = load_config(tmp_path / "config.yaml")
    assert used.model.hidden_size == 32 and used.parallel.tensor_model_parallel_size == 2
