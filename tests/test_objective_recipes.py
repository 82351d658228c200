"""The list-wise and regression recipes end to end on a tiny model (issue #28):
preprocess text records, train from a converted reward model, export with mcore2hf,
score with megarm.score and transformers; held-out accuracy / RMSE asserted."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megarm.testing import run_distributed
from tests.helpers import helpsteer_text_record, ranked_text_record

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
ATTRIBUTES = ["helpfulness", "correctness", "coherence", "complexity", "verbosity"]


def _preprocess(tmp: Path, name: str, rows: list[dict], handler: str, tokenizer: Path) -> str:
    from megarm.data.preprocess import main as preprocess

    raw = tmp / f"{name}.jsonl"
    raw.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prefix = str(tmp / name / "data")
    assert preprocess(["--input", str(raw), "--output-prefix", prefix, "--tokenizer-name-or-path",
                       str(tokenizer), "--handler-name", handler, "--seq-length", "64"]) == 0
    return prefix


def _train(mcore: str, data: str, save: str | None, overrides: list[str]) -> list[dict]:
    from megarm import distributed
    from megarm.config import load_config
    from megarm.training.loop import Trainer

    cfg = load_config(None, [
        f"model.hf_config={mcore}", "model.params_dtype=fp32", f"checkpoint.load={mcore}",
        "checkpoint.finetune=true", f"checkpoint.save={save}" if save else "checkpoint.save=null",
        f"data.data_path={data}", "data.split=100,0,0", "data.seq_length=64",
        "optimizer.lr=2e-3", "optimizer.lr_warmup_fraction=0.1", "logging.log_dir=null",
        *overrides,
    ])  # fmt: skip
    distributed.init_from_config(cfg)
    trainer = Trainer(cfg)
    trainer.train()
    trainer.close()
    return trainer.history


def _export(save: Path, out: Path, tokenizer: Path) -> Path:
    done = subprocess.run(
        [sys.executable, "ckpt_convert/mcore2hf.py", "--load-dir", str(save), "--save-dir",
         str(out), "--tokenizer-model", str(tokenizer)],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _score(load: Path, records: Path, out: Path, *extra: str) -> list[dict]:
    done = subprocess.run(
        [sys.executable, "-m", "megarm.score", "--load", str(load), "--input", str(records),
         "--output", str(out), "--seq-length", "64", *extra],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


def _evaluate(load: Path, data: Path, out: Path, *extra: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "megarm.evaluate", "--load", str(load), "--data", str(data),
         "--output", str(out), "--seq-length", "64", *extra],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def _hf(export: Path) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(export, dtype=torch.float32).eval()


@pytest.mark.slow
def test_listwise_recipe_trains_exports_and_ranks_held_out_records(rm_checkpoint, rm_tokenizer, tmp_path):
    from megarm.data.dataset import RankedDataset

    rng = random.Random(5)
    train = _preprocess(tmp_path, "train", [ranked_text_record(rng) for _ in range(64)], "ranked",
                        rm_tokenizer)
    held = [ranked_text_record(rng) for _ in range(16)]
    held_prefix = _preprocess(tmp_path, "held", held, "ranked", rm_tokenizer)
    save = tmp_path / "run"
    ((history,),) = [run_distributed(_train, 1, str(rm_checkpoint), train, str(save), [
        "training.objective=listwise", "training.train_iters=24", "training.micro_batch_size=4",
        "training.global_batch_size=8"])]  # fmt: skip
    assert history[-1]["loss"] < history[0]["loss"]
    export = _export(save, tmp_path / "hf", rm_tokenizer)
    model = _hf(export)
    data = RankedDataset(held_prefix)
    concordant = pairs = top1 = 0
    with torch.no_grad():
        for i in range(len(data)):
            item = data[i]
            r = [float(model(input_ids=torch.tensor([row.tolist()])).logits[0, 0])
                 for row in item["ranked_input_ids"]]
            s = item["scores"].tolist()
            top1 += s[r.index(max(r))] == max(s)
            for a in range(len(s)):
                for b in range(len(s)):
                    if s[a] > s[b]:
                        pairs += 1
                        concordant += r[a] > r[b]
    # Chance is 0.5 pairwise and 0.25 top-1; the run is 24 steps of a 2-layer model.
    assert concordant / pairs > 0.8, (concordant, pairs)
    assert top1 / len(data) > 0.5
    # megarm.score on the export: the same rewards as transformers, pairwise per record.
    singles = tmp_path / "singles.jsonl"
    singles.write_text("".join(json.dumps({"prompt": rec["prompt"], "response": resp}) + "\n"
                               for rec in held[:2] for resp in rec["responses"]))
    scored = _score(export, singles, tmp_path / "scored.jsonl")
    with torch.no_grad():
        expect = [float(model(input_ids=torch.tensor([row.tolist()])).logits[0, 0])
                  for i in range(2) for row in data[i]["ranked_input_ids"]]
    assert [line["reward"] for line in scored] == pytest.approx(expect, abs=1e-5)


@pytest.mark.slow
def test_listwise_processes_each_response_once_where_the_pairwise_split_does_three_times(
    rm_checkpoint, rm_tokenizer, tmp_path
):
    from itertools import combinations

    rng = random.Random(9)
    records = [ranked_text_record(rng) for _ in range(8)]
    ranked = _preprocess(tmp_path, "ranked", records, "ranked", rm_tokenizer)
    pairs = [{"prompt": r["prompt"], "chosen": r["responses"][a], "rejected": r["responses"][b]}
             for r in records for a, b in combinations(range(4), 2)
             for a, b in [(a, b) if r["scores"][a] > r["scores"][b] else (b, a)]]
    assert len(pairs) == 8 * 6
    split = _preprocess(tmp_path, "split", pairs, "pairwise_messages", rm_tokenizer)
    # The same 2 optimizer steps over the same file: 4 records or 24 pairs per step.
    ((lists,),) = [run_distributed(_train, 1, str(rm_checkpoint), ranked, None, [
        "training.objective=listwise", "training.train_iters=2", "training.micro_batch_size=4",
        "training.global_batch_size=4"])]  # fmt: skip
    ((pairwise,),) = [run_distributed(_train, 1, str(rm_checkpoint), split, None, [
        "training.train_iters=2", "training.micro_batch_size=12",
        "training.global_batch_size=24"])]  # fmt: skip
    stats = json.loads(Path(ranked + "_stats.json").read_text())
    list_tokens = sum(h["tokens"] for h in lists)
    assert list_tokens == stats["tokens"]["responses"]  # every response once
    assert sum(h["sequences"] for h in lists) == 32
    assert sum(h["tokens"] for h in pairwise) == 3 * list_tokens  # each response K-1 = 3 times
    assert sum(h["sequences"] for h in pairwise) == 96


@pytest.mark.slow
def test_regression_recipe_exports_five_labels_that_score_and_serve_agree_on(
    rm_checkpoint, rm_tokenizer, tmp_path
):
    from megarm.data.dataset import RegressionDataset

    rng = random.Random(3)
    rows = [helpsteer_text_record(rng, missing=i % 7 == 0) for i in range(96)]
    train = _preprocess(tmp_path, "train", rows, "helpsteer2", rm_tokenizer)
    held = [helpsteer_text_record(rng) for _ in range(24)]
    held_prefix = _preprocess(tmp_path, "held", held, "helpsteer2", rm_tokenizer)
    save = tmp_path / "run"
    ((history,),) = [run_distributed(_train, 1, str(rm_checkpoint), train, str(save), [
        "training.objective=regression", "model.num_labels=5",
        "model.label_names=" + ",".join(ATTRIBUTES), "training.train_iters=60",
        "training.micro_batch_size=8", "training.global_batch_size=16"])]  # fmt: skip
    assert history[-1]["loss"] < history[0]["loss"]
    export = _export(save, tmp_path / "hf", rm_tokenizer)
    config = json.loads((export / "config.json").read_text())
    assert len(config["id2label"]) == 5
    assert [config["id2label"][str(i)] for i in range(5)] == ATTRIBUTES
    assert config["problem_type"] == "regression"
    assert config["architectures"] == ["Qwen2ForSequenceClassification"]
    model = _hf(export)
    assert model.config.num_labels == 5
    data = RegressionDataset(held_prefix)
    with torch.no_grad():
        predicted = torch.stack([model(input_ids=torch.tensor([data[i]["input_ids"].tolist()]))
                                 .logits[0] for i in range(len(data))]).double()
    targets = torch.stack([torch.from_numpy(data[i]["targets"]).double() for i in range(len(data))])
    rmse = ((predicted - targets) ** 2).mean(0).sqrt()
    baseline = ((targets - targets.mean(0)) ** 2).mean(0).sqrt()  # predicting the mean
    # Held-out RMSE of the attributes the words determine, well below the mean
    # predictor's (60 steps of a 2-layer model from a random head).
    for a in (0, 2, 3):
        assert rmse[a] < 0.75 * baseline[a], (ATTRIBUTES[a], float(rmse[a]), float(baseline[a]))
    # megarm.score on the checkpoint and on the export: every attribute as transformers
    # computes it (1e-5, fp32), the reward their --attribute-weights combination.
    singles = tmp_path / "singles.jsonl"
    singles.write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["response"]})
                               + "\n" for r in held[:6]))
    weights = {"helpfulness": 0.65, "correctness": 0.8, "verbosity": -0.4}
    option = ("--attribute-weights", ",".join(f"{k}={v}" for k, v in weights.items()))
    for load in (export, save):
        scored = _score(load, singles, tmp_path / f"scored_{load.name}.jsonl", *option,
                        "--tokenizer-name-or-path", str(rm_tokenizer))
        for i, line in enumerate(scored):
            want = predicted[i].tolist()
            assert [line["attributes"][n] for n in ATTRIBUTES] == pytest.approx(want, abs=1e-5)
            combined = sum(w * want[ATTRIBUTES.index(n)] for n, w in weights.items())
            assert line["reward"] == pytest.approx(combined, abs=1e-5)
    # megarm.evaluate: per-attribute RMSE/Pearson on the labelled file, and pairwise
    # accuracy of the combined scalar (helpfulness alone here) on pairs of it.
    labelled = tmp_path / "held.jsonl"  # the file preprocessed above
    result = _evaluate(export, labelled, tmp_path / "labelled.json", "--format", "labelled",
                       "--handler-name", "helpsteer2")
    for a, name in enumerate(ATTRIBUTES):
        assert result["metrics"][f"rmse/{name}"] == pytest.approx(float(rmse[a]), rel=1e-5)
    order = sorted(range(len(held)), key=lambda i: -held[i]["helpfulness"])
    pair_rows = [{"prompt": held[i]["prompt"], "chosen": held[i]["response"],
                  "rejected": held[j]["response"]} for i, j in zip(order[:8], order[-8:])]
    pair_file = tmp_path / "pairs.jsonl"
    pair_file.write_text("".join(json.dumps(r) + "\n" for r in pair_rows))
    result = _evaluate(export, pair_file, tmp_path / "pairs.json", "--format", "pairs",
                       "--attribute-weights", "helpfulness=1")
    # The same rows through megarm.score (checked against transformers above): the
    # combined scalar is the predicted helpfulness, and accuracy counts chosen > rejected.
    sides = tmp_path / "sides.jsonl"
    sides.write_text("".join(json.dumps({"prompt": r["prompt"], "response": r[k]}) + "\n"
                             for r in pair_rows for k in ("chosen", "rejected")))
    side_scores = [line["reward"] for line in _score(export, sides, tmp_path / "sides_out.jsonl",
                                                     "--attribute-weights", "helpfulness=1")]
    hand = sum(c > r for c, r in zip(side_scores[::2], side_scores[1::2], strict=True)) / 8
    assert result["metrics"]["accuracy"] == pytest.approx(hand)
    assert hand >= 0.75  # the 8 most helpful against the 8 least
    # The server: the attributes and the combined scalar.
    from fastapi.testclient import TestClient

    from megarm.rewards.backends import ScorerSpec, open_scorer
    from megarm.serve import ModelLoop, create_app

    scorer, encoder, info = open_scorer(ScorerSpec(str(export), seq_length=64,
                                                   attribute_weights=option[1]))
    loop = ModelLoop(scorer)
    messages = [[{"role": "user", "content": held[0]["prompt"]},
                 {"role": "assistant", "content": held[0]["response"]}]]
    import threading

    app = create_app(loop, encoder, info, model_name="hs2")
    with TestClient(app) as client:
        worker = threading.Thread(target=loop.run, daemon=True)
        worker.start()
        body = client.post("/score", json={"messages": messages}).json()
    worker.join(timeout=30)
    assert [body["attributes"][0][n] for n in ATTRIBUTES] == pytest.approx(predicted[0].tolist(), abs=1e-5)
    assert body["rewards"][0] == pytest.approx(
        sum(w * float(predicted[0][ATTRIBUTES.index(n)]) for n, w in weights.items()), abs=1e-5)
    assert not math.isnan(body["rewards"][0])
