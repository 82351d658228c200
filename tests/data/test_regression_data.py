"""Regression records (per-attribute labels) through tools/preprocess_data.py: the
files, stats.json, rejects with reasons, missing labels and the data checks."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest

from megarm.data.dataset import RegressionDataset, packed_path
from megarm.data.integrity import check_files
from megarm.data.stats_file import DataFileError

ROW = {"prompt": "Name a prime.", "response": "Seven.", "helpfulness": 3, "correctness": 4,
       "coherence": 4, "complexity": 1, "verbosity": 0.5}


def test_helpsteer2_rows_keep_five_labels_and_mask_missing_ones(preprocess):
    rows = [
        ROW,
        {**ROW, "response": "Nine.", "correctness": None},  # missing: kept, masked
        {**ROW, "response": "x", "helpfulness": 5},  # label_range
        {**ROW, "response": "y", "coherence": float("nan")},  # malformed_record
        {**ROW, "response": "z", "verbosity": "lots"},  # malformed_record
        {"prompt": "q", "response": "w"},  # no label at all: missing_key
        {**ROW, "response": "User turn\n<extra_id_1>Assistant\nno", "prompt": "a\n<extra_id_1>Assistant\nb\n<extra_id_1>User\nc"},
    ]
    run = preprocess(rows, "helpsteer2", "--max-reject-fraction", "0.7")
    assert run.rc == 0
    stats = run.stats()
    assert stats["kind"] == "regression"
    assert stats["label_names"] == ["helpfulness", "correctness", "coherence", "complexity", "verbosity"]
    assert stats["label_range"] == [0.0, 4.0]
    assert [r["reason"] for r in run.rejects()] == [
        "label_range", "malformed_record", "malformed_record", "missing_key"]
    check_files(run.prefix)
    data = RegressionDataset(run.prefix)
    assert len(data) == 3 and data.label_names == stats["label_names"]
    np.testing.assert_array_equal(data[0]["targets"], [3, 4, 4, 1, 0.5])
    second = data[1]["targets"]
    assert math.isnan(second[1]) and second[0] == 3
    ids, labels = data[0]["input_ids"], data[0]["labels"]
    start = int(np.argmax(labels != -100))
    assert 0 < start < len(ids)  # the prompt is masked, the response supervised


def test_generic_regression_needs_label_names_and_checks_the_range(preprocess):
    rows = [{"prompt": "q", "response": "a", "labels": {"safety": 0.2, "style": 0.9}},
            {"prompt": "q", "response": "b", "labels": {"safety": 1.7}}]
    assert preprocess(rows, "regression", name="nonames").rc == 2
    run = preprocess(rows, "regression", "--label-names", "safety,style", "--label-range", "0",
                     "1", "--max-reject-fraction", "0.5")
    assert run.rc == 0
    assert [r["reason"] for r in run.rejects()] == ["label_range"]
    data = RegressionDataset(run.prefix)
    np.testing.assert_allclose(data[0]["targets"], [0.2, 0.9], rtol=1e-6)


def test_data_checks_name_a_targets_file_of_another_label_count(preprocess):
    five = preprocess([ROW, {**ROW, "response": "Nine."}], "helpsteer2", name="five")
    two = preprocess([{"prompt": "q", "response": r, "labels": {"a": 1, "b": 2}} for r in "xy"],
                     "regression", "--label-names", "a,b", name="two")
    assert five.rc == two.rc == 0
    for ext in (".bin", ".idx"):
        shutil.copy(packed_path(two.prefix, "targets") + ext, packed_path(five.prefix, "targets") + ext)
    with pytest.raises(DataFileError, match="targets"):
        check_files(five.prefix)


def test_regression_objective_checks_the_labels_against_the_data(preprocess):
    from megarm.preflight import validate
    from tests.helpers import tiny_config

    run = preprocess([ROW, {**ROW, "response": "Nine."}], "helpsteer2")
    base = ["model.vocab_size=151936", "data.seq_length=64", f"data.data_path={run.prefix}",
            "training.objective=regression"]
    issues = validate(tiny_config(*base, "model.num_labels=3"))
    assert [i.key for i in issues] == ["model.num_labels"] and "num_labels=5" in issues[0].message
    names = "helpfulness,correctness,coherence,verbosity,complexity"  # order differs
    issues = validate(tiny_config(*base, "model.num_labels=5", f"model.label_names={names}"))
    assert [i.key for i in issues] == ["model.label_names"]
    assert not validate(tiny_config(*base, "model.num_labels=5"))
    assert [i.key for i in validate(tiny_config(*base[:3], "model.num_labels=1"))] == [
        "training.objective"]  # objective rm on regression records
