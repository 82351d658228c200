"""Reward statistics after training, and the reward fields of an export: a short run
on preprocessed pairs, exported with mcore2hf; config.json must carry problem_type,
the reward convention and the mean/std of the validation rewards, which transformers
reproduces from the export on the same pairs."""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megarm.demo_common import make_pair
from megarm.testing import run_distributed

REPO = Path(__file__).resolve().parents[1]


def _train(mcore: str, data: str, save: str) -> None:
    from megarm import distributed
    from megarm.config import load_config
    from megarm.training.loop import Trainer

    cfg = load_config(None, [
        f"model.hf_config={mcore}", "model.params_dtype=fp32", f"checkpoint.load={mcore}",
        "checkpoint.finetune=true", f"checkpoint.save={save}", f"data.data_path={data}",
        "data.split=50,50,0", "data.seq_length=64", "training.train_iters=2",
        "training.micro_batch_size=2", "training.global_batch_size=4", "optimizer.lr=1e-3",
    ])  # fmt: skip
    distributed.init_from_config(cfg)
    trainer = Trainer(cfg)
    trainer.train()
    trainer.close()


def validation_rows(data: str) -> list[tuple[list[int], list[int]]]:
    from megarm.data.dataset import build_pair_datasets

    _, valid, _ = build_pair_datasets(data, "50,50,0")
    return [(valid[i]["chosen_input_ids"].tolist(), valid[i]["rejected_input_ids"].tolist())
            for i in range(len(valid))]  # fmt: skip


@pytest.mark.slow
def test_training_stores_reward_stats_that_the_export_carries(rm_checkpoint, rm_tokenizer, tmp_path):
    from megarm.data.preprocess import main as preprocess

    rng = random.Random(11)
    raw = tmp_path / "pairs.jsonl"
    raw.write_text("".join(json.dumps(make_pair(rng)) + "\n" for _ in range(16)))
    prefix = str(tmp_path / "data" / "pairs")
    assert preprocess(["--input", str(raw), "--output-prefix", prefix, "--tokenizer-name-or-path",
                       str(rm_tokenizer), "--handler-name", "pairwise_messages",
                       "--seq-length", "64"]) == 0  # fmt: skip
    save = tmp_path / "run"
    run_distributed(_train, 1, str(rm_checkpoint), prefix, str(save))
    iteration = save / "iter_0000002"
    recorded = json.loads((iteration / "reward_stats.json").read_text())
    assert recorded["count"] == 16  # 8 validation pairs, chosen and rejected

    export = tmp_path / "hf"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "ckpt_convert/mcore2hf.py", "--load-dir", str(save), "--save-dir",
         str(export), "--tokenizer-model", str(rm_tokenizer)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((export / "config.json").read_text())
    assert config["problem_type"] == "regression" and len(config["id2label"]) == 1  # one label
    assert config["pad_token_id"] == 151643
    assert config["reward_convention"]["sequence_end"] == "<|im_end|>\n"
    assert (config["mean"], config["std"]) == (recorded["mean"], recorded["std"])
    assert (export / "chat_template.jinja").is_file() or "chat_template" in json.loads(
        (export / "tokenizer_config.json").read_text()
    )

    # transformers on the export, over the same validation pairs: the same statistics.
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(export, dtype=torch.float32).eval()
    rewards = []
    with torch.no_grad():
        for pair in validation_rows(prefix):
            for row in pair:
                rewards.append(float(model(input_ids=torch.tensor([row])).logits[0, 0]))
    assert config["mean"] == pytest.approx(statistics.fmean(rewards), abs=1e-5)
    assert config["std"] == pytest.approx(statistics.stdev(rewards), abs=1e-5)

    # The tool on the export (no recorded split: given) writes the same into config.json.
    from megarm.reward_stats import main as reward_stats

    config_path = export / "config.json"
    config_path.write_text(json.dumps({k: v for k, v in config.items() if k not in ("mean", "std")}))
    argv = ["--load", str(export), "--data", prefix, "--split", "50,50,0", "--write"]
    assert reward_stats(argv) == 0
    rewritten = json.loads(config_path.read_text())
    assert rewritten["mean"] == pytest.approx(config["mean"], abs=1e-5)
    assert rewritten["std"] == pytest.approx(config["std"], abs=1e-5)
