"""megarm.score: the reward convention end to end, and an output that never destroys
an input or fails only after the work is done."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import pytest
import torch

from megarm.demo_common import make_pair
from megarm.score import main as score_main

ATOL = 1e-5


def demo_pairs(path: Path, count: int = 12) -> list[dict]:
    rng = random.Random(5)
    rows = [make_pair(rng) for _ in range(count)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def transformers_rewards(export: Path, rows: list[dict]) -> list[tuple[float, float]]:
    """The route RewardBench, TRL and vLLM take: the whole conversation through the
    tokenizer's own ``apply_chat_template``, one sequence at a time (no padding)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(export)
    model = AutoModelForSequenceClassification.from_pretrained(export, dtype=torch.float32).eval()
    out = []
    for row in rows:
        pair = []
        for side in ("chosen", "rejected"):
            messages = [{"role": "user", "content": row["prompt"]},
                        {"role": "assistant", "content": row[side]}]  # fmt: skip
            ids = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
            with torch.no_grad():
                pair.append(float(model(input_ids=torch.tensor([ids])).logits[0, 0]))
        out.append((pair[0], pair[1]))
    return out


def test_three_routes_give_the_same_rewards(rm_export, tmp_path):
    """megarm.score, transformers with apply_chat_template, and chat text that ends at
    <|im_end|> (OpenRLHF's query) all read the reward at the same token."""
    from megarm import cli
    from megarm.rewards.backends import open_scorer
    from megarm.score import build_parser

    data = tmp_path / "heldout.jsonl"
    rows = demo_pairs(data)
    out = tmp_path / "rewards.jsonl"
    assert score_main(["--load", str(rm_export), "--input", str(data), "--output", str(out)]) == 0
    megarm = [(r["chosen_reward"], r["rejected_reward"]) for r in map(json.loads, out.open())]

    reference = transformers_rewards(rm_export, rows)

    args: argparse.Namespace = build_parser().parse_args(
        ["--load", str(rm_export), "--input", "-", "--output", "-"]
    )
    scorer, encoder, _ = open_scorer(cli.scorer_spec(args))
    tok = encoder.tokenizer
    texts = []
    for row in rows:
        for side in ("chosen", "rejected"):
            messages = [{"role": "user", "content": row["prompt"]},
                        {"role": "assistant", "content": row[side]}]  # fmt: skip
            text = tok.apply_chat_template(messages, tokenize=False)
            assert text.endswith("<|im_end|>\n")
            texts.append(text[: -len("\n")])
    flat = scorer.rewards([encoder.text(t) for t in texts])
    openrlhf = list(zip(flat[0::2], flat[1::2], strict=True))

    for got, want, text_route in zip(megarm, reference, openrlhf, strict=True):
        assert got == pytest.approx(want, abs=ATOL)
        assert text_route == pytest.approx(want, abs=ATOL)
    # Equal rewards, hence equal accuracy; the pairs are not all won or all lost.
    accuracy = [sum(c > r for c, r in route) for route in (megarm, reference, openrlhf)]
    assert accuracy[0] == accuracy[1] == accuracy[2]
    spread = {round(c - r, 6) for c, r in reference}
    assert len(spread) == len(rows)


def test_output_equal_to_input_is_refused(rm_export, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    demo_pairs(data, 2)
    before = data.read_bytes()
    link = tmp_path / "link.jsonl"
    link.symlink_to(data)
    for output in (data, link):
        argv = ["--load", str(rm_export), "--input", str(data), "--output", str(output)]
        assert score_main(argv) == 2
        assert "is an input file" in capsys.readouterr().err
    assert data.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.jsonl", "pairs.jsonl"]


def test_unwritable_output_fails_before_the_model_loads(rm_export, tmp_path, capsys, monkeypatch):
    data = tmp_path / "pairs.jsonl"
    demo_pairs(data, 2)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr("megarm.score.open_scorer", no_model)
    argv = ["--load", str(rm_export), "--input", str(data), "--output", str(blocker / "out.jsonl")]
    assert score_main(argv) == 2
    assert "cannot write --output" in capsys.readouterr().err


def test_failed_run_leaves_no_output(rm_export, tmp_path, capsys):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    out = tmp_path / "out" / "rewards.jsonl"
    argv = ["--load", str(rm_export), "--input", str(data), "--output", str(out)]
    assert score_main(argv) == 2
    assert "holds no records" in capsys.readouterr().err
    assert list(out.parent.iterdir()) == []
