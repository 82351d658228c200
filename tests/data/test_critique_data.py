"""Preprocessing for critique models: SFT records (only the target supervised) and
critique pairs (prompt + response + critique turn, only the critique supervised,
the reward at its end), read back with megatron-core and checked like pairs."""

from __future__ import annotations

import json

import pytest

from megarm.config import load_config
from megarm.data.dataset import SFTDataset, build_pair_datasets
from megarm.data.integrity import check_files
from megarm.data.templates import DEFAULT_CRITIQUE_PROMPT
from megarm.preflight import validate

IM_END_NL = "<|im_end|>\n"


def chatml(*turns: tuple[str, str]) -> str:
    return "".join(f"<|im_start|>{role}\n{text}<|im_end|>\n" for role, text in turns)


def decode(tokenizer, ids) -> str:
    return tokenizer.decode([int(i) for i in ids if i != -100])


SFT_ROWS = [
    {"question": "Say hi", "target": "hi there"},
    {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                  {"role": "assistant", "content": "b"}]},
    {"question": "x", "completion": "y"},
    {"question": "x", "completion": " "},  # rejected: empty target
    {"question": "no target"},  # rejected: missing key
]


def test_sft_records_supervise_only_the_target(preprocess, qwen_tokenizer, read_indexed):
    run = preprocess(SFT_ROWS, "sft", "--prompt-type", "chatml", "--map-keys",
                     '{"prompt": "question"}', "--max-reject-fraction", "0.5")
    assert run.rc == 0
    stats = run.stats()
    assert stats["kind"] == "sft"
    assert stats["counts"]["kept"] == 3 and stats["rejects"]["empty_response"] == 1
    assert stats["rejects"]["missing_key"] == 1
    ids = read_indexed(run.prefix, "input_ids")
    labels = read_indexed(run.prefix, "labels")
    expected = [
        (chatml(("user", "Say hi")), "hi there"),
        (chatml(("system", "S"), ("user", "a")), "b"),
        (chatml(("user", "x")), "y"),
    ]
    for row, label, (prompt, target) in zip(ids, labels, expected, strict=True):
        full = prompt + "<|im_start|>assistant\n" + target + IM_END_NL
        assert qwen_tokenizer.decode(row) == full
        assert decode(qwen_tokenizer, label) == target + IM_END_NL
        masked = label.count(-100)
        assert label[masked:] == row[masked:] and -100 not in label[masked:]
    assert stats["supervised_tokens"] == sum(len(x) - x.count(-100) for x in labels)
    # The dataset reader, the start-up file checks and the objective check accept it.
    check_files(run.prefix)
    (train, _, _) = build_pair_datasets(run.prefix, "100,0,0")
    assert isinstance(train.dataset, SFTDataset) and len(train) == 3
    assert train[0]["input_ids"].tolist() == ids[0]
    base = [f"data.data_path={run.prefix}", "data.seq_length=64", "model.vocab_size=151936"]
    issues = validate(load_config(None, [*base, "training.objective=rm"]))
    assert [i.key for i in issues] == ["training.objective"]
    assert "holds SFT records" in issues[0].message and "objective=sft" in issues[0].message
    assert validate(load_config(None, [*base, "training.objective=sft"])) == []


CRITIQUE_ROWS = [
    {"q": "What is 2+2?", "chosen": "4", "rejected": "5",
     "good": "Correct.", "bad": "Wrong: 2+2 is 4."},
    {"q": [{"role": "user", "content": "Hi"}], "chosen": "Hello!", "rejected": "Go away.",
     "good": "Polite.", "bad": ""},  # rejected: empty critique
]


def test_critique_pairs_supervise_the_critique_and_end_like_the_chat_template(
    preprocess, qwen_tokenizer, read_indexed
):
    request = "Is this answer to '{prompt}' right? Answer: {response}"
    run = preprocess(
        CRITIQUE_ROWS, "critique_pairs", "--map-keys",
        '{"prompt": "q", "chosen_critique": "good", "rejected_critique": "bad"}',
        "--critique-prompt", request, "--max-reject-fraction", "0.5", "--workers", "2",
    )
    assert run.rc == 0
    stats = run.stats()
    assert stats["kind"] == "critique_pairs" and stats["counts"]["kept"] == 1
    assert stats["rejects"]["empty_response"] == 1
    convention = stats["template"]["reward_convention"]
    assert convention["critique_prompt"] == request
    assert convention["sequence_end"] == IM_END_NL
    pairs = run.pairs()
    for side, critique in (("chosen", "Correct."), ("rejected", "Wrong: 2+2 is 4.")):
        response = CRITIQUE_ROWS[0][side]
        conversation = [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": response},
            {"role": "user", "content": f"Is this answer to 'What is 2+2?' right? Answer: {response}"},
            {"role": "assistant", "content": critique},
        ]
        # The sequence is what the tokenizer's own chat template writes for the whole
        # conversation (default system prompt included): the reward token is its end.
        want = qwen_tokenizer.apply_chat_template(conversation, tokenize=False)
        row, labels = pairs[f"{side}_input_ids"][0], pairs[f"{side}_labels"][0]
        assert qwen_tokenizer.decode(row) == want
        assert row[-1] == convention["reward_token_id"]
        assert decode(qwen_tokenizer, labels) == critique + IM_END_NL
        masked = labels.count(-100)
        assert labels[masked:] == row[masked:]
    # Masked prefixes differ between the sides (they hold the responses): the sampled
    # file check must not mistake that for files of another run.
    cut = pairs["chosen_labels"][0].count(-100)
    assert pairs["chosen_input_ids"][0][:cut] != pairs["rejected_input_ids"][0][:cut]
    check_files(run.prefix)
    base = [f"data.data_path={run.prefix}", "data.seq_length=256", "model.vocab_size=151936"]
    assert validate(load_config(None, [*base, "training.objective=joint"])) == []
    issues = validate(load_config(None, [*base, "training.objective=sft"]))
    assert [i.key for i in issues] == ["training.objective"]


def test_critique_pairs_cut_the_prompt_never_the_critique(preprocess, qwen_tokenizer):
    long = {"q": "word " * 200, "chosen": "a", "rejected": "b", "good": "fine", "bad": "poor"}
    run = preprocess([long], "critique_pairs", "--map-keys",
                     '{"prompt": "q", "chosen_critique": "good", "rejected_critique": "bad"}',
                     "--seq-length", "96", "--prompt-type", "chatml")
    assert run.rc == 0 and run.stats()["counts"]["truncated"] == 1
    pairs = run.pairs()
    assert max(len(pairs[f"{side}_input_ids"][0]) for side in ("chosen", "rejected")) == 96
    for side, critique in (("chosen", "fine"), ("rejected", "poor")):
        assert len(pairs[f"{side}_input_ids"][0]) <= 96
        assert decode(qwen_tokenizer, pairs[f"{side}_labels"][0]) == critique + IM_END_NL
        assert qwen_tokenizer.decode(pairs[f"{side}_input_ids"][0]).endswith(
            f"{long[side]}<|im_end|>\n<|im_start|>user\n{DEFAULT_CRITIQUE_PROMPT}<|im_end|>\n"
            f"<|im_start|>assistant\n{critique}<|im_end|>\n"
        )


def test_sft_handler_refuses_a_margin(preprocess):
    run = preprocess([{"prompt": "a", "target": "b", "m": 1}], "sft", "--margin", "m")
    assert run.rc == 2


def test_default_critique_prompt_is_recorded(preprocess):
    row = {k: v for k, v in CRITIQUE_ROWS[0].items()}
    run = preprocess([row], "critique_pairs", "--map-keys",
                     json.dumps({"prompt": "q", "chosen_critique": "good", "rejected_critique": "bad"}))
    assert run.stats()["template"]["reward_convention"]["critique_prompt"] == DEFAULT_CRITIQUE_PROMPT
    with pytest.raises(KeyError):
        run.stats()["template"]["reward_convention"]["missing"]
