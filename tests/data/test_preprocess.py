"""End-to-end: tools/preprocess_data.py on rows written here, read back with megatron-core."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from megarm.data.preprocess import main

REPO = Path(__file__).resolve().parents[2]
HEADER = [151644, 77091, 198]  # "<|im_start|>assistant\n"
IM_END = 151645
QWEN_SYS = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\n"
)


def chatml(*turns: tuple[str, str]) -> str:
    body = "".join(f"<|im_start|>{role}\n{text}<|im_end|>\n" for role, text in turns)
    return body + "<|im_start|>assistant\n"


# handler -> (rows, extra args, expected [(prompt text, chosen, rejected, margin)])
CASES = {
    "hh_rlhf": (
        [
            {
                "chosen": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Fact?\n\nAssistant: Water is wet.",
                "rejected": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Fact?\n\nAssistant: No.",
            },
            {
                "chosen": "\n\nHuman: Café? 😀\n\nAssistant: Oui.",
                "rejected": "\n\nHuman: Café? 😀\n\nAssistant: Non",
            },
        ],
        [],
        [
            (
                QWEN_SYS + chatml(("user", "Hi"), ("assistant", "Hello."), ("user", "Fact?")),
                "Water is wet.",
                "No.",
                None,
            ),
            (QWEN_SYS + chatml(("user", "Café? 😀")), "Oui.", "Non", None),
        ],
    ),
    "pairwise_messages": (
        [
            {
                "system": "Be nice.",
                "question": "Q?",
                "chosen": "A",
                "rejected": "B",
                "sc": 9,
                "sr": 2.5,
            },
            {
                "chosen": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hey!"},
                ],
                "rejected": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Go."},
                ],
                "sc": 1,
                "sr": 3,
            },
        ],
        ["--map-keys", '{"prompt": "question", "margin": ["sc", "sr"]}'],
        [
            (chatml(("system", "Be nice."), ("user", "Q?")), "A", "B", 6.5),
            (QWEN_SYS + chatml(("user", "Hi")), "Hey!", "Go.", -2.0),
        ],
    ),
    "alpaca_pairwise": (
        [
            {
                "instruction": "Translate",
                "input": "bonjour",
                "output": ["hello", "goodbye"],
                "history": [["Hi", "Hello!"]],
            }
        ],
        [],
        [
            (
                QWEN_SYS
                + chatml(("user", "Hi"), ("assistant", "Hello!"), ("user", "Translate\nbonjour")),
                "hello",
                "goodbye",
                None,
            )
        ],
    ),
    "stack_exchange_paired": (
        [{"question": "How do I sort?", "response_j": "Use sorted().", "response_k": "You can't."}],
        ["--prompt-type", "chatml"],  # no default system prompt
        [(chatml(("user", "How do I sort?")), "Use sorted().", "You can't.", None)],
    ),
    "helpsteer2_preference": (
        [
            {"prompt": "P1", "response_1": "r1", "response_2": "r2", "preference_strength": 2},
            {"prompt": "P2", "response_1": "s1", "response_2": "s2", "preference_strength": -1},
        ],
        ["--margin", "preference_strength"],
        [
            (QWEN_SYS + chatml(("user", "P1")), "r2", "r1", 2.0),
            (QWEN_SYS + chatml(("user", "P2")), "s1", "s2", 1.0),
        ],
    ),
}


@pytest.mark.parametrize("handler", sorted(CASES))
def test_written_ids_decode_to_the_templated_text(
    handler, preprocess, qwen_tokenizer, read_indexed
):
    rows, extra, expected = CASES[handler]
    run = preprocess(rows, handler, *extra)
    assert run.rc == 0
    pairs = run.pairs()
    stats = run.stats()
    assert stats["counts"] == {
        "records": len(rows),
        "kept": len(rows),
        "rejected": 0,
        "truncated": 0,
    }
    for key, docs in pairs.items():
        assert len(docs) == len(expected), key  # megatron-core reads one document per pair
    for i, (prompt, chosen, rejected, _) in enumerate(expected):
        prompt_len = len(qwen_tokenizer.encode(prompt, add_special_tokens=False))
        for side, response in (("chosen", chosen), ("rejected", rejected)):
            ids = pairs[f"{side}_input_ids"][i]
            labels = pairs[f"{side}_labels"][i]
            # Each response ends as the chat template ends a turn: <|im_end|>\n.
            assert qwen_tokenizer.decode(ids) == prompt + response + "<|im_end|>\n"
            assert ids[prompt_len - 3 : prompt_len] == HEADER and ids[-2:] == [IM_END, 198]
            assert labels == [-100] * prompt_len + ids[prompt_len:]
            assert qwen_tokenizer.decode(ids[prompt_len:]) == response + "<|im_end|>\n"
    margins = [m for *_, m in expected]
    files = run.files()
    if margins[0] is None:
        assert "data_packed_margin_document.bin" not in files and not stats["has_margin"]
    else:
        assert read_indexed(run.prefix, "margin") == [[m] for m in margins]
    lengths = [len(ids) for ids in pairs["chosen_input_ids"]]
    assert stats["lengths"]["chosen"]["max"] == max(lengths)
    assert stats["lengths"]["chosen"]["p50"] == pytest.approx(float(np.percentile(lengths, 50)))
    assert stats["tokens"]["chosen"] == sum(lengths)
    assert stats["handler"] == handler and stats["megarm_version"]
    assert stats["tokenizer"]["vocab_sha256"] == (
        "698c955b0b438a535083d1771ef8b41069afba4b3d51a482558bdb68ea55e800"
    )


def hh_rows(n: int, seed: int = 0) -> list[dict]:
    """Varied HH-style pairs (lengths 1-60 words), deterministic."""
    rng = np.random.RandomState(seed)
    words = ["alpha", "beta", "gamma", "delta", "naïve", "中文", "😀", "x" * 7, "the", "of"]
    rows = []
    for _ in range(n):
        say = lambda k: " ".join(rng.choice(words, size=k))  # noqa: E731
        prompt = f"\n\nHuman: {say(rng.randint(1, 60))}"
        rows.append(
            {
                "chosen": f"{prompt}\n\nAssistant: {say(rng.randint(1, 40))}",
                "rejected": f"{prompt}\n\nAssistant: {say(rng.randint(1, 40))}",
            }
        )
    return rows


def test_workers_give_byte_identical_files(tmp_path, preprocess, write_jsonl):
    rows = hh_rows(400)
    rows[7] = '{"chosen": broken'
    rows[100]["rejected"] = rows[100]["chosen"]
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    one = preprocess(source, "hh_rlhf", "--workers", "1", name="w1")
    two = preprocess(source, "hh_rlhf", "--workers", "2", "--chunk-size", "16", name="w2")
    four = preprocess(source, "hh_rlhf", "--workers", "4", "--chunk-size", "16", name="w4")
    assert one.rc == two.rc == four.rc == 0
    assert (
        one.stats()["counts"]
        == two.stats()["counts"]
        == {"records": 400, "kept": 398, "rejected": 2, "truncated": 0}
    )
    names = one.files()
    assert names == two.files() and len(names) == 10  # 4 keys x (.bin, .idx) + stats + rejects
    for name in names:
        if name != "data_stats.json":  # holds the arguments and timings
            first = (tmp_path / "w1" / name).read_bytes()
            assert first == (tmp_path / "w2" / name).read_bytes(), name
            assert first == (tmp_path / "w4" / name).read_bytes(), name


def test_every_reject_reason_is_counted_and_listed(preprocess, read_indexed):
    good = {"prompt": "P", "response_1": "a", "response_2": "b", "preference_strength": 1}
    rows = [
        good,
        '{"prompt": "P", "response_1": ',  # line 2
        {"prompt": "P", "response_1": "a", "preference_strength": 1},
        {**good, "response_1": "  "},
        {**good, "response_2": "a"},
        {**good, "preference_strength": 0},
        {**good, "response_2": "long " * 80},
        "[1, 2]",  # line 8: JSON, but not an object
        good,
    ]
    run = preprocess(
        rows, "helpsteer2_preference", "--seq-length", "48", "--max-reject-fraction", "0.9"
    )
    assert run.rc == 0
    stats = run.stats()
    assert stats["counts"] == {"records": 9, "kept": 2, "rejected": 7, "truncated": 0}
    assert stats["rejects"] == {
        "malformed_json": 1,
        "malformed_record": 1,
        "missing_key": 1,
        "empty_response": 1,
        "identical": 1,
        "tie": 1,
        "too_long": 1,
        "too_large": 0,
        # The ranked and regression records' reasons, counted at 0 for pairs.
        "too_few_responses": 0,
        "score_count": 0,
        "label_range": 0,
        # The step-labelled (PRM) records' reasons.
        "no_steps": 0,
        "step_label_count": 0,
        "unknown_label": 0,
        "marker_in_step": 0,
    }
    listed = [(r["line"], r["reason"]) for r in run.rejects()]
    assert listed == [
        (2, "malformed_json"),
        (3, "missing_key"),
        (4, "empty_response"),
        (5, "identical"),
        (6, "tie"),
        (7, "too_long"),
        (8, "malformed_record"),
    ]
    first = run.rejects()[0]
    assert first["source"].endswith("out.jsonl") and first["raw"] == rows[1]
    assert "response_2" in run.rejects()[1]["detail"]
    assert len(read_indexed(run.prefix, "chosen_input_ids")) == 2


def test_too_many_rejects_fail_without_output(tmp_path, preprocess, capsys):
    rows = [{"chosen": "no transcript", "rejected": "x"}] * 3 + hh_rows(2)
    run = preprocess(rows, "hh_rlhf")
    assert run.rc == 2
    message = capsys.readouterr().err
    assert "3 of 5 records rejected (60.0% > --max-reject-fraction 0.5)" in message
    assert "out.jsonl:line 1: malformed_record" in message
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_missing_tokenizer_input_and_bad_options(tmp_path, qwen_tokenizer_dir, capsys, write_jsonl):
    source = write_jsonl(tmp_path / "in.jsonl", hh_rows(2))
    base = ["--output-prefix", str(tmp_path / "o" / "d"), "--handler-name", "hh_rlhf"]
    tok = ["--tokenizer-name-or-path", str(qwen_tokenizer_dir)]
    cases = [
        (
            ["--input", str(source), "--tokenizer-name-or-path", str(tmp_path / "no_tok")],
            "does not exist",
        ),
        (["--input", str(tmp_path / "none.jsonl"), *tok], "input"),
        (["--input", str(source), *tok, "--tokenizer-type", "GPT2BPETokenizer"], "not supported"),
        (["--input", str(source), *tok, "--truncation", "middle"], "--truncation 'middle'"),
        (["--input", str(source)], "missing required option(s): --tokenizer-name-or-path"),
    ]
    for extra, needle in cases:
        assert main(base + extra) == 2
        assert needle in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or list((tmp_path / "o").iterdir()) == []


def test_truncation_policies(preprocess, qwen_tokenizer):
    long_prompt = " ".join(["word"] * 100)
    rows = [
        {
            "chosen": f"\n\nHuman: {long_prompt}\n\nAssistant: Yes.",
            "rejected": f"\n\nHuman: {long_prompt}\n\nAssistant: No way.",
        },
        {
            "chosen": "\n\nHuman: Hi\n\nAssistant: Hello.",
            "rejected": "\n\nHuman: Hi\n\nAssistant: Bye.",
        },
        {
            "chosen": "\n\nHuman: Hi\n\nAssistant: " + "ok " * 50,
            "rejected": "\n\nHuman: Hi\n\nAssistant: no",
        },
    ]
    full = qwen_tokenizer.encode(QWEN_SYS + chatml(("user", long_prompt)), add_special_tokens=False)
    yes, no_way = (
        qwen_tokenizer.encode(t + "<|im_end|>\n", add_special_tokens=False)
        for t in ("Yes.", "No way.")
    )
    keep = 40 - max(len(yes), len(no_way))  # both sides share one prompt cut to this
    assert (len(full), len(yes), len(no_way), keep) == (129, 4, 5, 35)

    left = preprocess(
        rows, "hh_rlhf", "--seq-length", "40", "--max-reject-fraction", "0.5", name="left"
    )
    pairs = left.pairs()
    assert pairs["chosen_input_ids"][0] == full[-keep:] + yes
    assert pairs["rejected_input_ids"][0] == full[-keep:] + no_way
    assert pairs["rejected_labels"][0] == [-100] * keep + no_way
    stats = left.stats()
    assert stats["counts"] == {"records": 3, "kept": 2, "rejected": 1, "truncated": 1}
    assert [r["line"] for r in left.rejects()] == [3]  # 50-token response cannot fit 40

    right = preprocess(rows, "hh_rlhf", "--seq-length", "40", "--truncation", "right", name="right")
    assert right.pairs()["chosen_input_ids"][0] == full[: keep - 3] + HEADER + yes

    drop = preprocess(
        rows,
        "hh_rlhf",
        "--seq-length",
        "40",
        "--truncation",
        "drop",
        "--max-reject-fraction",
        "0.7",
        name="drop",
    )
    assert drop.stats()["counts"] == {"records": 3, "kept": 1, "rejected": 2, "truncated": 0}
    assert [(r["line"], r["reason"]) for r in drop.rejects()] == [(1, "too_long"), (3, "too_long")]


def test_yaml_config_with_cli_override(
    tmp_path, qwen_tokenizer_dir, capsys, write_jsonl, read_indexed
):
    source = write_jsonl(
        tmp_path / "uf.jsonl",
        [{"prompt": "Q", "chosen": "A", "rejected": "B", "score_chosen": 7, "score_rejected": 4}],
    )
    config = tmp_path / "uf.yaml"
    config.write_text(
        f"input: {source}\n"
        f"output_prefix: {tmp_path / 'uf' / 'data'}\n"
        f"tokenizer_name_or_path: {qwen_tokenizer_dir}\n"
        "tokenizer_type: PretrainedFromHF\n"
        "handler_name: pairwise_messages\n"
        "map_keys: {margin: [score_chosen, score_rejected]}\n"
        "workers: 2\n"
        "seq_length: '256'\n"
    )
    assert main(["--config", str(config), "--workers", "1"]) == 0
    stats = json.loads((tmp_path / "uf" / "data_stats.json").read_text())
    args = stats["arguments"]
    assert (args["workers"], args["seq_length"], args["tokenizer_type"]) == (
        1,
        256,
        "PretrainedFromHF",
    )
    assert read_indexed(str(tmp_path / "uf" / "data"), "margin") == [[3.0]]
    config.write_text(config.read_text() + "shuffle: true\n")
    assert main(["--config", str(config)]) == 2
    assert "unknown keys ['shuffle']" in capsys.readouterr().err


def test_killed_run_leaves_no_final_files(tmp_path, qwen_tokenizer_dir, write_jsonl):
    source = write_jsonl(tmp_path / "big.jsonl", hh_rows(12000, seed=1))
    prefix = tmp_path / "out" / "big"
    argv = [
        sys.executable,
        str(REPO / "tools" / "preprocess_data.py"),
        "--input",
        str(source),
        "--output-prefix",
        str(prefix),
        "--tokenizer-name-or-path",
        str(qwen_tokenizer_dir),
        "--handler-name",
        "hh_rlhf",
    ]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    started = False
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        found = list(prefix.parent.glob("big.tmp-*_packed_chosen_input_ids_document.bin"))
        if found and found[0].stat().st_size > 0:  # pairs are being written
            started = True
            break
        time.sleep(0.05)
    if not started:
        proc.kill()
        pytest.fail(f"the run never started writing: {proc.communicate()[1].decode()[-2000:]}")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    names = sorted(p.name for p in prefix.parent.iterdir())
    assert names and all(name.startswith("big.tmp-") for name in names), names
    assert not list(prefix.parent.glob("big_*"))


@pytest.mark.parametrize(
    "config", sorted((REPO / "configs" / "datasets").glob("*.yaml")), ids=lambda p: p.stem
)
def test_shipped_dataset_configs_parse(config):
    from megarm.data.handlers import get_handler
    from megarm.data.preprocess import parse_args

    args = parse_args(["--config", str(config)])
    handler = get_handler(args.handler_name, args.map_keys, args.margin)
    assert args.output_prefix.startswith("data/processed/")
    expected_margin = config.stem in ("ultrafeedback_binarized", "helpsteer2")
    assert handler.has_margin == expected_margin


def test_fit_prompt_rules_shared_with_scoring():
    from megarm.data.encoding import fit_prompt
    from megarm.data.handlers import RecordError

    prompt = [1, 2, 3, 4, 5, 90, 91]  # the last 2 tokens are the assistant header
    assert fit_prompt(prompt, 3, None, 2) == (prompt, False)
    assert fit_prompt(prompt, 3, 10, 2) == (prompt, False)
    assert fit_prompt(prompt, 4, 10, 2) == ([2, 3, 4, 5, 90, 91], True)  # left
    assert fit_prompt(prompt, 4, 10, 2, "right") == ([1, 2, 3, 4, 90, 91], True)
    with pytest.raises(RecordError) as exc:
        fit_prompt(prompt, 4, 10, 2, "drop")
    assert exc.value.reason == "too_long"
    with pytest.raises(RecordError):  # even the header does not fit
        fit_prompt(prompt, 9, 10, 2)


def test_a_record_over_the_byte_limit_is_rejected_before_tokenising(preprocess, monkeypatch):
    """Issue #25: a 100 MB line was tokenised whole (2 min 24 s, 10.3 GiB) before the cut."""
    from megarm.data import encoding

    good = {"prompt": "P", "response_1": "a", "response_2": "b", "preference_strength": 1}
    big = {**good, "prompt": "word " * 2000}  # 10 kB, over the 4 kB limit below
    seen: list[int] = []
    real = encoding._encode
    monkeypatch.setattr(encoding, "_encode", lambda tok, texts: seen.append(
        max(map(len, texts))) or real(tok, texts))
    run = preprocess([good, big, good], "helpsteer2_preference", "--seq-length", "4096",
                     "--max-record-bytes", "4096", "--truncation", "left")
    assert run.rc == 0
    stats = run.stats()
    assert stats["rejects"]["too_large"] == 1 and stats["counts"]["kept"] == 2
    (reject,) = run.rejects()
    assert (reject["line"], reject["reason"]) == (2, "too_large")
    assert "--max-record-bytes 4,096" in reject["detail"]
    assert max(seen) < 1000  # the 10 kB prompt never reached the tokenizer
    # Without the option a 4096-token run allows 1 MiB (4 MiB at least): it is kept.
    from megarm.data.preprocess import default_max_record_bytes

    assert default_max_record_bytes(4096) == 4 << 20 and default_max_record_bytes(65536) == 16 << 20
    again = preprocess([good, big, good], "helpsteer2_preference", "--seq-length", "4096",
                       name="default")
    assert again.rc == 0 and again.stats()["counts"]["kept"] == 3
