"""Ranked records (K scored responses per prompt) through tools/preprocess_data.py:
the files, stats.json, rejects with reasons, the data checks and the dataset."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from megarm.data.dataset import RankedDataset, build_pair_datasets, packed_path
from megarm.data.integrity import check_files
from megarm.data.stats_file import DataFileError

GOOD = [
    {"prompt": "Name a prime.", "responses": ["Two.", "Nine.", "Seven.", "Four."],
     "scores": [3, 0, 2, 1]},
    {"prompt": "Say hi.", "responses": ["Hi!", "Go away.", "Hello there."], "scores": [1, 0, 1]},
    {"prompt": "Capital of France?", "responses": ["Paris.", "Rome."], "scores": [9.5, 2]},
]
BAD = [
    ({"prompt": "q", "responses": ["only one"], "scores": [1]}, "too_few_responses"),
    ({"prompt": "q", "responses": ["a", "b", "c"], "scores": [1, 2]}, "score_count"),
    ({"prompt": "q", "responses": ["a", "b"], "scores": [1, float("nan")]}, "malformed_record"),
    ({"prompt": "q", "responses": ["a", "b"], "scores": [4, 4]}, "tie"),
]


def test_ranked_records_are_written_with_k_responses_and_scores(preprocess, qwen_tokenizer):
    rows = GOOD + [row for row, _ in BAD]
    run = preprocess(rows, "ranked", "--max-reject-fraction", "0.6")
    assert run.rc == 0
    stats = run.stats()
    assert stats["kind"] == "ranked"
    assert stats["counts"]["kept"] == 3 and stats["counts"]["rejected"] == 4
    assert stats["responses_per_record"] == {"min": 2, "max": 4, "mean": 3.0}
    for _, reason in BAD:
        assert stats["rejects"][reason] >= 1, reason
    assert [r["reason"] for r in run.rejects()] == [reason for _, reason in BAD]
    assert sorted(f for f in run.files() if f.startswith("data_packed")) == sorted(
        f"data_packed_{key}_document.{ext}" for key in ("ranked_input_ids", "ranked_labels", "scores")
        for ext in ("bin", "idx"))
    check_files(run.prefix)
    data = RankedDataset(run.prefix)
    assert len(data) == 3
    for i, row in enumerate(GOOD):
        item = data[i]
        np.testing.assert_array_equal(item["scores"], np.asarray(row["scores"], np.float32))
        assert len(item["ranked_input_ids"]) == len(row["responses"])
        prompts = set()
        for ids, labels, text in zip(item["ranked_input_ids"], item["ranked_labels"],
                                     row["responses"], strict=True):
            start = int(np.argmax(labels != -100))
            prompts.add(tuple(ids[:start].tolist()))
            np.testing.assert_array_equal(labels[start:], ids[start:])
            assert text in qwen_tokenizer.decode(ids[start:].tolist())
        assert len(prompts) == 1  # the K responses share the prompt
    total = sum(len(x) for i in range(3) for x in data[i]["ranked_input_ids"])
    assert stats["tokens"]["responses"] == total
    train, valid, _ = build_pair_datasets(run.prefix, "100,0,0")
    assert len(train) == 3 and valid is None


def test_ultrafeedback_rows_preprocess_as_ranked(preprocess):
    row = {"instruction": "Name a prime.", "completions": [
        {"response": f"answer {i}", "overall_score": s} for i, s in enumerate([7.5, 4.0, 9.0, 6.0])]}
    run = preprocess([row, row], "ultrafeedback_ranked")
    assert run.rc == 0
    data = RankedDataset(run.prefix)  # kept alive: its items view the mapped files
    np.testing.assert_array_equal(data[1]["scores"], [7.5, 4.0, 9.0, 6.0])
    assert len(data[1]["ranked_input_ids"]) == 4


def test_data_checks_name_a_scores_file_from_another_run(preprocess, tmp_path):
    first = preprocess(GOOD, "ranked", name="one")
    other = preprocess(GOOD[:2], "ranked", name="two")
    assert first.rc == other.rc == 0
    for ext in (".bin", ".idx"):
        shutil.copy(packed_path(other.prefix, "scores") + ext, packed_path(first.prefix, "scores") + ext)
    with pytest.raises(DataFileError, match="scores"):
        check_files(first.prefix)


def test_objective_and_data_kind_must_agree(preprocess):
    from megarm.preflight import validate
    from tests.helpers import tiny_config

    run = preprocess(GOOD, "ranked")
    over = ["model.vocab_size=151936", "data.seq_length=64", f"data.data_path={run.prefix}"]
    issues = validate(tiny_config(*over))  # objective rm on ranked records
    assert [i.key for i in issues] == ["training.objective"], issues
    assert "listwise" in issues[0].message
    assert not validate(tiny_config(*over, "training.objective=listwise"))
