"""megarm.evaluate: hand-built files in each benchmark format with known answers.

The fast tests score with a stand-in model whose reward is the number written as the
response, so every metric is known exactly (ties included) and compared with ``==``.
The slow test scores one file with the HF export and with the same weights as a TP=2
megarm checkpoint, and expects the same results."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megarm.evaluate import evaluate, flatten, main
from megarm.rewards.encoding import build_encoder
from megarm.testing import run_distributed


@pytest.fixture(scope="module")
def encoder(rm_tokenizer):
    return build_encoder(str(rm_tokenizer))


def numeric_rewards(encoder):
    """A model whose reward is the response text read as a number."""

    def rewards(rows):
        out = []
        for row in rows:
            text = encoder.tokenizer.decode(row)
            response = text.rsplit("<|im_start|>assistant\n", 1)[1]
            out.append(float(response.removesuffix("<|im_end|>\n")))
        return out

    return rewards


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_rewardbench_subsets_and_weighted_sections(encoder, tmp_path):
    def rec(subset, chosen, rejected):
        return {"prompt": "q", "chosen": chosen, "rejected": rejected, "subset": subset}

    data = write_jsonl(tmp_path / "rb.jsonl", [
        rec("alpacaeval-easy", "2", "1"),
        rec("alpacaeval-easy", "1", "1"),  # a tie counts as wrong
        rec("mt-bench-easy", "3", "0"),
        rec("mt-bench-hard", "1", "0.5"),
        rec("hep-python", "1", "2"),
        rec("hep-python", "5", "4"),
        rec("xstest-should-respond", "0", "1"),
        rec("my-own-subset", "1", "0"),
        "{not json",
        {"prompt": "q", "chosen": "1", "subset": "donotanswer"},
    ])  # fmt: skip
    result = evaluate(str(data), "auto", encoder, numeric_rewards(encoder))
    assert result["format"] == "rewardbench"
    m = result["metrics"]
    assert m["subsets"] == {
        "alpacaeval-easy": 0.5, "hep-python": 0.5, "mt-bench-easy": 1.0, "mt-bench-hard": 1.0,
        "my-own-subset": 1.0, "xstest-should-respond": 0.0,
    }  # fmt: skip
    # RewardBench weights subsets by its EXAMPLE_COUNTS: Chat = (0.5*100 + 1.0*28) / 128.
    assert m["sections"] == {
        "Chat": 78 / 128, "Chat Hard": 1.0, "Safety": 0.0, "Reasoning": 0.5,
    }  # fmt: skip
    assert m["score"] == pytest.approx((78 / 128 + 1.0 + 0.0 + 0.5) / 4, abs=1e-12)
    assert (m["pairs"], m["ties"], result["scored"]) == (8, 1, 8)
    assert [(s["index"], s["reason"].split(":")[0]) for s in result["skipped"]] == [
        (8, "malformed_json"), (9, "missing_key"),
    ]  # fmt: skip


def test_rewardbench2_best_of_four_ties_and_the_ties_subset(encoder, tmp_path):
    def rec(subset, chosen, rejected, rid="x", num_correct=None):
        return {"id": rid, "prompt": "q", "subset": subset, "chosen": chosen,
                "rejected": rejected, "num_correct": num_correct or len(chosen)}  # fmt: skip

    records = [
        rec("Focus", ["3"], ["1", "2", "0"]),  # 1
        rec("Focus", ["2"], ["2", "1", "0"]),  # tied with one other: 1/2
        rec("Focus", ["2"], ["2", "2", "2"]),  # tied with three: 1/4
        rec("Focus", ["1"], ["2", "0", "0"]),  # 0
        rec("Math", ["5"], ["4", "4", "4"]),  # 1
        rec("Ties", ["5"], ["1", "2"], "ref:1"),
        rec("Ties", ["4", "3"], ["1", "2"], "tied:1"),
        rec("Ties", ["2"], ["1", "0"], "ref:2"),
        rec("Ties", ["6", "5.5"], ["1", "0"], "tied:2"),
    ]
    data = tmp_path / "rb2.json"  # a JSON array this time
    data.write_text(json.dumps(records))
    m = evaluate(str(data), "rewardbench2", encoder, numeric_rewards(encoder))["metrics"]
    # Ties (process_single_model): both accuracies 1; prompt 1 has margin 1 = spread 1
    # (not preferred), prompt 2 margin min(1, 4.5) = 1 > spread 0.5 (preferred), and
    # the margin term averages tanh(1/1 - 1) = 0 and tanh(1/0.5 - 1) = tanh(1).
    ties = 0.3 + 0.3 + 0.2 * 0.5 + 0.2 * 0.5 + 0.01 * math.tanh(1.0) / 2
    assert m["subsets"]["Focus"] == (1 + 0.5 + 0.25 + 0) / 4
    assert m["subsets"]["Math"] == 1.0
    assert m["subsets"]["Ties"] == pytest.approx(ties, abs=1e-12)
    assert m["score"] == pytest.approx((0.4375 + 1.0 + ties) / 3, abs=1e-12)


def test_rmbench_style_matrix_per_domain(encoder, tmp_path):
    records = [
        # chosen concise/plain/markdown vs rejected: hard (upper), normal, easy (lower)
        {"prompt": "q", "chosen": ["3", "2", "1"], "rejected": ["2.5", "1.5", "0.5"], "domain": "chat"},
        {"prompt": "q", "chosen": ["1", "1", "1"], "rejected": ["1", "1", "1"], "domain": "chat"},
        {"prompt": "q", "chosen": ["0", "0", "0"], "rejected": ["1", "1", "1"], "domain": "math"},
        {"prompt": "q", "chosen": ["1", "1"], "rejected": ["0", "0"], "domain": "math"},
    ]  # fmt: skip
    data = tmp_path / "rmb.parquet"
    pq.write_table(pa.Table.from_pylist(records), data)
    result = evaluate(str(data), "auto", encoder, numeric_rewards(encoder))
    assert result["format"] == "rmbench"
    m = result["metrics"]
    # chat: record 1 wins all of its upper triangle and diagonal, none of its lower
    # triangle; record 2 ties everywhere (all wrong). math loses everything.
    assert m["domains"]["chat"] == {"hard": 0.5, "normal": 0.5, "easy": 0.0, "average": 1 / 3}
    assert m["domains"]["math"] == {"hard": 0.0, "normal": 0.0, "easy": 0.0, "average": 0.0}
    assert (m["hard"], m["normal"], m["easy"]) == (0.25, 0.25, 0.0)
    assert m["average"] == pytest.approx(1 / 6, abs=1e-12)
    assert [s["index"] for s in result["skipped"]] == [3]
    assert "not 3" in result["skipped"][0]["reason"]


def test_pairs_with_any_handler(encoder, tmp_path):
    data = write_jsonl(tmp_path / "se.jsonl", [
        {"question": "q", "response_j": "2", "response_k": "1"},
        {"question": "q", "response_j": "1", "response_k": "3"},
        {"question": "q", "response_j": "1", "response_k": "1.0"},  # equal rewards: a tie
        {"question": "q", "response_j": "1", "response_k": "1"},  # the handler refuses it
    ])  # fmt: skip
    result = evaluate(str(data), "pairs", encoder, numeric_rewards(encoder), "stack_exchange_paired")
    assert result["metrics"] == {"accuracy": 1 / 3, "pairs": 3, "ties": 1, "subsets": {"all": 1 / 3}}
    assert result["skipped"] == [
        {"index": 3, "reason": "identical: chosen and rejected responses are identical"}
    ]
    assert flatten(result["metrics"])["subsets/all"] == 1 / 3


# --------------------------------------------------------------------------- real models

RB_RECORDS = [
    {"prompt": "Write a short sentence about a cat.", "chosen": "the cat sleeps.",
     "rejected": "sleeps cat the.", "subset": "alpacaeval-easy"},
    {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": "4", "rejected": "5",
     "subset": "math-prm"},
    {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "", "subset": "donotanswer"},
    {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven.",
     "subset": "llmbar-natural"},
]  # fmt: skip


def _evaluate_checkpoint(argv: list[str]) -> int:
    return main(argv)


def _training_time(checkpoint: str, data: str, tokenizer: str, log_dir: str) -> None:
    """A Trainer with ``training.eval_benchmark`` evaluating once at TP=2 (every rank in
    step): the scores go to metrics.jsonl as the ``benchmark`` split."""
    from megarm import distributed
    from megarm.checkpoint.load import saved_model_settings
    from megarm.config import load_config
    from megarm.training.loop import Trainer

    cfg = load_config(None, [
        "model.params_dtype=fp32",
        "parallel.tensor_model_parallel_size=2", f"checkpoint.load={checkpoint}",
        f"training.eval_benchmark={data}", f"data.tokenizer_name_or_path={tokenizer}",
        "data.seq_length=64", "data.synthetic_num_pairs=16", "training.global_batch_size=2",
        "training.micro_batch_size=1", f"logging.log_dir={log_dir}", "logging.tensorboard=false",
    ], settings=saved_model_settings(checkpoint))
    distributed.init_from_config(cfg)
    trainer = Trainer(cfg)
    trainer.evaluate()
    trainer.close()


@pytest.mark.slow
def test_export_and_tp2_checkpoint_give_equal_results(rm_export, rm_checkpoint, tmp_path):
    data = write_jsonl(tmp_path / "rb.jsonl", RB_RECORDS)
    hf_out, tp_out = tmp_path / "hf.json", tmp_path / "tp2.json"
    assert main(["--load", str(rm_export), "--data", str(data), "--output", str(hf_out)]) == 0
    argv = ["--load", str(rm_checkpoint), "--data", str(data), "--output", str(tp_out),
            "--tensor-model-parallel-size", "2"]  # fmt: skip
    assert run_distributed(_evaluate_checkpoint, 2, argv) == [0, 0]
    hf, tp = json.loads(hf_out.read_text()), json.loads(tp_out.read_text())
    assert hf["metrics"] == tp["metrics"]
    assert hf["scored"] == tp["scored"] == 4 and hf["skipped"] == tp["skipped"] == []
    for a, b in zip(hf["records"], tp["records"], strict=True):
        assert a["scores"] == pytest.approx(b["scores"], rel=1e-5, abs=1e-6)  # fp32 summation order
    assert "| subsets/alpacaeval-easy |" in hf_out.with_suffix(".md").read_text()
    log_dir = tmp_path / "run"
    run_distributed(_training_time, 2, str(rm_checkpoint), str(data), str(rm_export), str(log_dir))
    rows = [json.loads(x) for x in (log_dir / "metrics.jsonl").read_text().splitlines()]
    (logged,) = [r for r in rows if r["split"] == "benchmark"]
    expected = flatten(hf["metrics"])
    assert {k: logged[k] for k in expected} == pytest.approx(expected)


@pytest.mark.parametrize("case", ["output_is_data", "output_is_md", "hard_link", "unwritable"])
def test_outputs_are_checked_before_any_model_loads(tmp_path, capsys, monkeypatch, case):
    """Issue #25: --output equal to --data replaced the benchmark file; --output r.md
    overwrote the results with the table; an unwritable output crashed after scoring."""
    import os

    data = write_jsonl(tmp_path / "rb.jsonl", RB_RECORDS)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr("megarm.evaluate.open_scorer", no_model)
    output = {
        "output_is_data": data,
        "output_is_md": tmp_path / "r.md",
        "hard_link": tmp_path / "link.jsonl",
        "unwritable": tmp_path / "ro" / "r.json",
    }[case]
    if case == "hard_link":
        os.link(data, output)
    if case == "unwritable":
        if os.geteuid() == 0:
            pytest.skip("root writes anywhere")
        output.parent.mkdir()
        output.parent.chmod(0o500)
    before = data.read_bytes()
    try:
        code = main(["--load", str(tmp_path / "model"), "--data", str(data), "--output", str(output)])
    finally:
        if case == "unwritable":
            output.parent.chmod(0o700)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err
    assert data.read_bytes() == before


def test_non_finite_metrics_are_written_as_null(tmp_path):
    from megarm.evaluate import _finite

    out = json.dumps(_finite({"score": float("nan"), "subsets": {"a": float("inf"), "b": 0.5}}),
                     allow_nan=False)
    assert json.loads(out) == {"score": None, "subsets": {"a": None, "b": 0.5}}


@pytest.mark.parametrize("bad", [None, "one", 0, 3, True])
def test_a_bad_num_correct_is_a_skipped_record_not_a_traceback(encoder, tmp_path, bad):
    """Issue #25: ``"num_correct": null`` in a RewardBench 2 row was a TypeError."""
    good = {"id": "a", "prompt": "q", "subset": "Focus", "chosen": ["3"], "rejected": ["1", "2"]}
    records = [good, {**good, "id": "b", "num_correct": bad}]
    data = write_jsonl(tmp_path / "rb2.jsonl", records)
    result = evaluate(str(data), "rewardbench2", encoder, numeric_rewards(encoder))
    assert result["scored"] == 1 and result["metrics"]["subsets"]["Focus"] == 1.0
    (skip,) = result["skipped"]
    assert skip["index"] == 1 and "num_correct" in skip["reason"]


def _counting(rewards, seen):
    """``rewards`` that records every row it is asked to score."""

    def wrapped(rows):
        seen.extend(tuple(r) for r in rows)
        return rewards(rows)

    return wrapped


@pytest.mark.parametrize("bad", ["one", 0])
def test_a_bad_num_correct_in_ties_skips_that_record_before_scoring(encoder, tmp_path, bad):
    """Issue #25: ``num_correct: "one"`` or ``0`` in Ties aborted the whole file (``0``
    only after scoring) with a message that named no record."""
    records = [
        {"id": "ref:1", "prompt": "q", "subset": "Ties", "chosen": ["5"], "rejected": ["1", "2"],
         "num_correct": 1},
        {"id": "tied:1", "prompt": "q", "subset": "Ties", "chosen": ["4", "3"],
         "rejected": ["1", "2"], "num_correct": bad},
        {"id": "ref:2", "prompt": "q", "subset": "Ties", "chosen": ["2"], "rejected": ["1", "0"]},
        {"id": "tied:2", "prompt": "q", "subset": "Ties", "chosen": ["6", "5.5"],
         "rejected": ["1", "0"], "num_correct": 2},
    ]  # fmt: skip
    data = write_jsonl(tmp_path / "rb2.jsonl", records)
    seen: list = []
    result = evaluate(str(data), "rewardbench2", encoder, _counting(numeric_rewards(encoder), seen))
    (skip,) = result["skipped"]
    assert (skip["index"], skip["id"]) == (1, "tied:1") and "num_correct" in skip["reason"]
    assert result["scored"] == 3 and len(seen) == 3 + 3 + 4  # the bad record was never scored
    # Prompt 2 alone is in both halves: margin min(1, 4.5) = 1 > spread 0.5.
    ties = 0.3 + 0.3 + 0.2 + 0.2 + 0.01 * math.tanh(1.0)
    assert result["metrics"]["subsets"]["Ties"] == pytest.approx(ties, abs=1e-12)


def test_duplicate_ties_ids_are_skipped_naming_the_first(encoder, tmp_path):
    """Issue #25: two Ties records with one id overwrote each other silently."""
    records = [
        {"id": "ref:1", "prompt": "q", "subset": "Ties", "chosen": ["5"], "rejected": ["1", "2"]},
        {"id": "ref:1", "prompt": "q", "subset": "Ties", "chosen": ["0"], "rejected": ["1", "2"]},
        {"id": "tied:1", "prompt": "q", "subset": "Ties", "chosen": ["4", "3"],
         "rejected": ["1", "2"], "num_correct": 2},
    ]  # fmt: skip
    data = write_jsonl(tmp_path / "rb2.jsonl", records)
    result = evaluate(str(data), "rewardbench2", encoder, numeric_rewards(encoder))
    (skip,) = result["skipped"]
    assert (skip["index"], skip["id"]) == (1, "ref:1")
    assert skip["reason"].startswith("duplicate_id") and "record 0" in skip["reason"]
    # The first ref:1 is scored: both accurate, tied margin 1 = spread 1 (not preferred),
    # 0.6; the second (the last one read, which used to win) would give 0.3 - 0.01 tanh 3.
    assert result["scored"] == 2
    assert result["metrics"]["subsets"]["Ties"] == pytest.approx(0.6, abs=1e-12)


def test_rmbench_unknown_or_missing_domains_are_skipped_with_their_reason(encoder, tmp_path):
    """Issue #25: rows of an unknown domain gave all-NaN metrics and vanished."""
    win = {"prompt": "q", "chosen": ["3", "3", "3"], "rejected": ["1", "1", "1"]}
    records = [{**win, "domain": "chat"}, {**win, "domain": "poetry"}, dict(win),
               {**win, "domain": "safety-refuse"}]  # fmt: skip
    data = write_jsonl(tmp_path / "rmb.jsonl", records)
    result = evaluate(str(data), "rmbench", encoder, numeric_rewards(encoder))
    reasons = {s["index"]: s["reason"].split(":")[0] for s in result["skipped"]}
    assert reasons == {1: "unknown_domain", 2: "missing_domain"}
    assert "poetry" in result["skipped"][0]["reason"]
    m = result["metrics"]
    assert sorted(m["domains"]) == ["chat", "safety"] and m["average"] == 1.0
    assert result["scored"] + len(result["skipped"]) == len(records)
    # Only unknown domains: refused as a file with nothing to score, not NaN metrics.
    only = write_jsonl(tmp_path / "rmb2.jsonl", [{**win, "domain": "poetry"}])
    with pytest.raises(Exception, match="no record could be scored"):
        evaluate(str(only), "rmbench", encoder, numeric_rewards(encoder))


def test_no_nan_is_written_as_a_score(encoder, tmp_path):
    """Issue #25: unknown subsets (and non-finite rewards) wrote ``"score": NaN``."""
    data = write_jsonl(tmp_path / "rb.jsonl", [
        {"prompt": "q", "chosen": "2", "rejected": "1", "subset": "my-own"},
        {"prompt": "q", "chosen": "nan", "rejected": "1", "subset": "my-own"},
        {"prompt": "q", "chosen": "inf", "rejected": "1", "subset": "my-own"},
    ])  # fmt: skip
    result = evaluate(str(data), "rewardbench", encoder, numeric_rewards(encoder))
    m = result["metrics"]
    assert m["unsectioned_subsets"] == ["my-own"] and m["subsets"] == {"my-own": 1.0}
    assert [(s["index"], s["reason"].split(":")[0]) for s in result["skipped"]] == [
        (1, "non_finite_reward"), (2, "non_finite_reward")]
    assert all(math.isfinite(v) for r in result["records"] for v in r["scores"])
    from megarm.evaluate import _finite

    text = json.dumps(_finite(result), allow_nan=False)  # what megarm.evaluate writes
    assert json.loads(text)["metrics"]["score"] is None
