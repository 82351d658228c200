"""A process reward model (issue #29) end to end on a tiny model: step-labelled text
preprocessed, trained from a converted reward model, exported with mcore2hf as
``*ForTokenClassification``; transformers' outputs at the step markers equal
megarm's (fp32, 1e-5)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from megarm.testing import run_distributed
from tests.helpers import assert_rewards_close
from tests.test_objective_recipes import _export, _preprocess, _train


def _step_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        a, b, c = rng.randint(1, 9), rng.randint(1, 9), rng.randint(1, 9)
        wrong = rng.random() < 0.5
        first = a + b + (1 if wrong else 0)
        rows.append({"prompt": f"What is {a}+{b}+{c}?",
                     "steps": [f"{a}+{b}={first}", f"{first}+{c}={first + c}", f"So {first + c}."],
                     "labels": [0, 0, 0] if wrong else [1, 1, 1]})
    return rows


def _megarm_step_values(save: str, rows: list[list[int]], positions: list[list[int]]):
    """The megarm checkpoint's value head at each row's step positions (TP=1, PP=1)."""
    from megarm.model.step import PairBatch, run_schedule
    from megarm.rewards.backends import MegatronScorer

    scorer = MegatronScorer(save, dtype="fp32")
    out = []
    with torch.no_grad():
        for row, at in zip(rows, positions, strict=True):
            tokens = torch.tensor([row])
            index = torch.tensor(at)
            batch = PairBatch(tokens=tokens, position_ids=torch.arange(len(row))[None],
                              reward_index=index, margin=torch.zeros(0),
                              reward_row=torch.zeros_like(index))
            (result,) = run_schedule(scorer.model, [batch])
            out.append(result["rewards"].double().tolist())
    scorer.close()
    return out


@pytest.mark.slow
def test_prm_export_is_token_classification_with_megarms_step_values(
    rm_checkpoint, rm_tokenizer, tmp_path: Path
):
    from transformers import AutoModelForTokenClassification

    from megarm.data.dataset import StepDataset

    rng = random.Random(5)
    train = _preprocess(tmp_path, "train", _step_rows(rng, 32), "prm_steps", rm_tokenizer)
    save = tmp_path / "run"
    ((history,),) = [run_distributed(_train, 1, str(rm_checkpoint), train, str(save), [
        "training.objective=prm", "training.train_iters=3", "training.micro_batch_size=4",
        "training.global_batch_size=8"])]  # fmt: skip
    assert all(h["steps"] > 8 for h in history)
    export = _export(save, tmp_path / "hf", rm_tokenizer)
    config = json.loads((export / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForTokenClassification"]
    assert len(config["id2label"]) == 1
    assert config["step_marker"] == "\n\n" and config["step_marker_id"] == 271
    assert config["reward_convention"]["step_marker_id"] == 271
    model = AutoModelForTokenClassification.from_pretrained(export, dtype=torch.float32).eval()
    assert model.config.num_labels == 1
    data = StepDataset(train)
    rows = [data[i]["input_ids"].tolist() for i in range(4)]
    positions = [data[i]["step_positions"].tolist() for i in range(4)]
    with torch.no_grad():
        hf = [model(input_ids=torch.tensor([r])).logits[0, at, 0].double().tolist()
              for r, at in zip(rows, positions, strict=True)]
    ((ours,),) = [run_distributed(_megarm_step_values, 1, str(save), rows, positions)]
    for got, want in zip(hf, ours, strict=True):
        assert_rewards_close(got, want)
    assert len({round(v, 6) for vs in ours for v in vs}) > 1  # not one constant
    # Per-step scoring is not built: megarm.score refuses the export and the checkpoint.
    from megarm.errors import ScoringError
    from megarm.rewards.backends import ScorerSpec, open_scorer

    for load in (export, save):
        with pytest.raises(ScoringError, match="process reward model"):
            open_scorer(ScorerSpec(str(load)))
