"""Step-labelled records (process reward models, issue #29) through
tools/preprocess_data.py: the marker positions and labels, stats.json and the
reward convention, rejects with reasons, truncation that cuts steps, and the data
checks."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from megarm.data.dataset import StepDataset, open_dataset, packed_path
from megarm.data.integrity import check_files
from megarm.data.stats_file import DataFileError

NEWLINES = 271  # Qwen2.5's id of "\n\n", the default step marker

STEPS = {"prompt": "What is 2+3+4?", "steps": ["2+3=5", "5+4=9", "So 9."], "labels": [1, 1, 1]}


def test_prm800k_steps_are_stored_at_their_markers_with_their_labels(preprocess, qwen_tokenizer):
    rows = [
        STEPS,
        {**STEPS, "steps": ["2+3=6", "6+4=10"], "labels": ["-", "-"]},
        {**STEPS, "steps": ["2+3=5", "5+4=9"], "labels": [1, 0]},  # neutral -> positive
        {**STEPS, "steps": [], "labels": []},  # no_steps
        {**STEPS, "labels": [1, 1]},  # step_label_count
        {**STEPS, "labels": [1, 2, 1]},  # unknown_label
        {**STEPS, "steps": ["a\n\nb", "c", "d"]},  # marker_in_step
    ]
    run = preprocess(rows, "prm_steps", "--max-reject-fraction", "0.6")
    assert run.rc == 0
    stats = run.stats()
    assert stats["kind"] == "prm"
    assert stats["step_marker"] == {"text": "\n\n", "id": NEWLINES}
    assert stats["steps"] == {"steps": 7, "cut_steps": 0, "negative_steps": 2}
    convention = stats["template"]["reward_convention"]
    assert convention["step_marker"] == "\n\n" and convention["step_marker_id"] == NEWLINES
    assert [r["reason"] for r in run.rejects()] == [
        "no_steps", "step_label_count", "unknown_label", "marker_in_step"]
    check_files(run.prefix)
    data = open_dataset(run.prefix)
    assert isinstance(data, StepDataset) and len(data) == 3
    first = data[0]
    ids, positions = first["input_ids"], first["step_positions"]
    assert ids[positions].tolist() == [NEWLINES] * 3
    np.testing.assert_array_equal(first["step_targets"], [1, 1, 1])
    np.testing.assert_array_equal(data[1]["step_targets"], [0, 0])
    np.testing.assert_array_equal(data[2]["step_targets"], [1, 1])
    # The row is prompt, then each step's own tokens followed by the marker, then the
    # turn's end: the text between two markers is exactly that step.
    between = ids[positions[0] + 1 : positions[1]].tolist()
    assert qwen_tokenizer.decode(between) == "5+4=9"
    start = int(np.argmax(first["labels"] != -100))
    assert qwen_tokenizer.decode(ids[start : positions[0]].tolist()) == "2+3=5"
    assert qwen_tokenizer.decode(ids[positions[-1] + 1 :].tolist()) == "<|im_end|>\n"


def test_neutral_label_can_be_negative_or_rejected_and_soft_labels_are_kept(preprocess):
    row = {**STEPS, "labels": [1, 0, -1]}
    negative = preprocess([row, STEPS], "prm_steps", "--neutral-label", "negative", name="neg")
    np.testing.assert_array_equal(open_dataset(negative.prefix)[0]["step_targets"], [1, 0, 0])
    reject = preprocess([row, STEPS], "prm_steps", "--neutral-label", "reject", name="rej")
    assert [r["reason"] for r in reject.rejects()] == ["unknown_label"]
    soft = [{**STEPS, "labels": [0.9, 0.25, 0.0]}, {**STEPS, "labels": [0.5, 1.5, 1]}]
    run = preprocess(soft, "prm_steps", "--step-labels", "soft", name="soft")
    assert run.stats()["step_labels"] == "soft"
    np.testing.assert_allclose(open_dataset(run.prefix)[0]["step_targets"], [0.9, 0.25, 0.0])
    assert [r["reason"] for r in run.rejects()] == ["unknown_label"]


def test_math_shepherd_tags_become_markers_and_labels(preprocess):
    question = "Janet has 3 apples and buys 4. How many?"
    solution = "Step 1: 3+4=7 ки\nStep 2: The answer is 7 ки"
    rows = [
        {"input": f"{question} {solution}", "label": f"{question} {solution.replace('ки', '+')}"},
        {"input": f"{question} {solution}",
         "label": f"{question} Step 1: 3+4=7 +\nStep 2: The answer is 7 -"},
        {"input": f"{question} Step 1: 3+4=7", "label": f"{question} Step 1: 3+4=7"},  # no tag
        {"input": f"{question} {solution}", "label": f"{question} Step 1: 3+4=7 +"},  # short
        {"input": f"{question} {solution}",
         "label": f"{question} Step 1: 3+4=7 +\nStep 2: The answer is 7 ?"},  # unknown
    ]
    run = preprocess(rows, "math_shepherd", "--max-reject-fraction", "0.7")
    assert run.rc == 0
    assert [r["reason"] for r in run.rejects()] == ["no_steps", "step_label_count", "unknown_label"]
    data = open_dataset(run.prefix)
    np.testing.assert_array_equal(data[0]["step_targets"], [1, 1])
    np.testing.assert_array_equal(data[1]["step_targets"], [1, 0])


def test_a_multi_token_marker_is_refused_and_a_special_token_marker_works(preprocess):
    assert preprocess([STEPS], "prm_steps", "--step-marker", " and then ", name="bad").rc == 2
    run = preprocess([STEPS], "prm_steps", "--step-marker", "<|endoftext|>", name="special")
    assert run.rc == 0
    stats = run.stats()
    assert stats["step_marker"] == {"text": "<|endoftext|>", "id": 151643}
    data = open_dataset(run.prefix)  # kept: its rows are views of the mapped files
    item = data[0]
    assert item["input_ids"][item["step_positions"]].tolist() == [151643] * 3


def test_a_long_solution_loses_its_trailing_steps_and_counts_them(preprocess):
    long_steps = [f"step {i}: " + "one two three four five " * 3 for i in range(6)]
    rows = [{"prompt": "q", "steps": long_steps, "labels": [1] * 6}, STEPS]
    run = preprocess(rows, "prm_steps", "--seq-length", "64")
    assert run.rc == 0
    stats = run.stats()
    data = open_dataset(run.prefix)
    kept = len(data[0]["step_positions"])
    assert 1 <= kept < 6
    assert stats["steps"]["cut_steps"] == 6 - kept and stats["counts"]["truncated"] == 1
    assert len(data[0]["input_ids"]) <= 64
    assert stats["steps"]["steps"] == kept + 3
    dropped = preprocess(rows, "prm_steps", "--seq-length", "64", "--truncation", "drop",
                         name="drop")
    assert [r["reason"] for r in dropped.rejects()] == ["too_long"]


def test_data_checks_name_a_step_file_from_another_run(preprocess):
    one = preprocess([STEPS, {**STEPS, "labels": ["+", "-", "-"]}], "prm_steps", name="one")
    two = preprocess([STEPS, {**STEPS, "steps": ["a", "b"], "labels": [1, 1]}], "prm_steps",
                     name="two")
    assert one.rc == two.rc == 0
    for ext in (".bin", ".idx"):
        shutil.copy(packed_path(two.prefix, "step_targets") + ext,
                    packed_path(one.prefix, "step_targets") + ext)
    with pytest.raises(DataFileError, match="step"):
        check_files(one.prefix)


def test_prm_objective_and_step_data_go_together(preprocess):
    from megarm.preflight import validate
    from tests.helpers import tiny_config

    run = preprocess([STEPS, {**STEPS, "labels": ["+", "-", "-"]}], "prm_steps")
    base = ["model.vocab_size=151936", "data.seq_length=64", f"data.data_path={run.prefix}"]
    assert not validate(tiny_config(*base, "training.objective=prm"))
    issues = validate(tiny_config(*base))  # objective rm on step-labelled solutions
    assert [i.key for i in issues] == ["training.objective"]
    assert "step-labelled" in issues[0].message and "training.objective=prm" in issues[0].message
