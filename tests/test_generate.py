"""``python -m megarm.generate`` (CLoud's stage 2) and scoring with a critique model:
critiques are transformers' greedy continuation of exactly the text the chat template
writes for prompt + response + critique turn; a crashed run resumes to the output an
uninterrupted run writes; ``megarm.score --critique-model`` reads the reward at the end
of the rows preprocessing's ``critique_pairs`` writes for the same critiques."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import assert_rewards_close

RECORDS = [
    {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
    {"prompt": [{"role": "user", "content": "Say hi"}], "chosen": "Hi!", "rejected": "No."},
    {"prompt": "Name a color.", "chosen": "Blue.", "rejected": "Seven."},
    {"prompt": "", "chosen": "x", "rejected": "x"},  # identical: skipped by the handler
]


@pytest.fixture(scope="module")
def critic(rm_tokenizer: Path, tmp_path_factory) -> Path:
    """A tiny random Qwen2ForCausalLM with the Qwen2.5 tokenizer (a stand-in export)."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(5)
    config = Qwen2Config(vocab_size=151936, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=256, tie_word_embeddings=True,
                         pad_token_id=151643)
    from tests.test_convert import perturb_

    out = tmp_path_factory.mktemp("critic") / "causal_lm"
    model = Qwen2ForCausalLM(config)
    perturb_(model, 5)  # diverse greedy continuations (a fresh init repeats one token)
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(rm_tokenizer)).save_pretrained(str(out))
    return out


def _generate(critic: Path, inputs: Path, output: Path, *extra: str) -> int:
    from megarm.generate import main

    return main(["--model", str(critic), "--input", str(inputs), "--output", str(output),
                 "--batch-size", "2", "--max-new-tokens", "6", *extra])


def test_critiques_continue_the_chat_template_and_resume_after_a_crash(
    critic, tmp_path, monkeypatch
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megarm.data.templates import DEFAULT_CRITIQUE_PROMPT

    inputs = tmp_path / "pairs.jsonl"
    inputs.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    assert _generate(critic, inputs, tmp_path / "whole.jsonl") == 0
    whole = [json.loads(line) for line in (tmp_path / "whole.jsonl").open()]
    assert [w["index"] for w in whole] == [0, 1, 2]  # record 3 skipped (identical)
    # Greedy continuation of the chat template's own text, up to <|im_end|>.
    tok = AutoTokenizer.from_pretrained(str(critic))
    model = AutoModelForCausalLM.from_pretrained(str(critic), dtype=torch.float32).eval()
    conversation = [{"role": "user", "content": "What is 2+2?"},
                    {"role": "assistant", "content": "5"},
                    {"role": "user", "content": DEFAULT_CRITIQUE_PROMPT}]
    text = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        new = model.generate(ids, max_new_tokens=6, do_sample=False,
                             eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))[0, ids.shape[1]:]
    new = new.tolist()
    new = new[: new.index(151645)] if 151645 in new else new
    assert whole[0]["rejected_critique"] == tok.decode(new)

    # A crash after the first batch (one record) leaves a partial output...
    _crash_after_one_batch(monkeypatch, critic, inputs, tmp_path / "resumed.jsonl")
    partial = tmp_path / "resumed.jsonl.partial"
    assert len(partial.read_text().splitlines()) == 1 and not (tmp_path / "resumed.jsonl").exists()
    partial.write_text(partial.read_text() + '{"index": 1, "prom')  # a line cut mid-write
    # ...which other settings may not resume, and the same command completes.
    assert _generate(critic, inputs, tmp_path / "resumed.jsonl", "--max-new-tokens", "5") == 2
    assert _generate(critic, inputs, tmp_path / "resumed.jsonl") == 0
    assert (tmp_path / "resumed.jsonl").read_text() == (tmp_path / "whole.jsonl").read_text()
    assert not partial.exists()


def test_score_with_a_critique_model_reads_the_reward_after_the_critique(
    critic, rm_export, tmp_path
):
    from megarm.data.dataset import PairDataset
    from megarm.data.preprocess import main as preprocess
    from megarm.rewards.backends import HFScorer
    from megarm.score import main as score

    inputs = tmp_path / "pairs.jsonl"
    inputs.write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:3]))
    out = tmp_path / "scored.jsonl"
    assert score(["--load", str(rm_export), "--critique-model", str(critic),
                  "--critique-max-new-tokens", "6", "--input", str(inputs),
                  "--output", str(out)]) == 0
    scored = [json.loads(line) for line in out.open()]
    # The critiques are the generator's; the rows those critique pairs preprocess to...
    assert _generate(critic, inputs, tmp_path / "gen.jsonl") == 0
    generated = [json.loads(line) for line in (tmp_path / "gen.jsonl").open()]
    for s, g in zip(scored, generated, strict=True):
        assert (s["chosen_critique"], s["rejected_critique"]) == (
            g["chosen_critique"], g["rejected_critique"])
    prefix = tmp_path / "data" / "critique"
    assert preprocess(["--input", str(tmp_path / "gen.jsonl"), "--output-prefix", str(prefix),
                       "--tokenizer-name-or-path", str(rm_export),
                       "--handler-name", "critique_pairs"]) == 0
    data = PairDataset(str(prefix))
    rows = [data[i][f"{side}_input_ids"].tolist() for i in range(len(data))
            for side in ("chosen", "rejected")]
    # ...score to the rewards megarm.score reported.
    rewards = HFScorer(str(rm_export)).rewards(rows)
    reported = [r for s in scored for r in (s["chosen_reward"], s["rejected_reward"])]
    assert_rewards_close(reported, rewards)


def _crash_after_one_batch(monkeypatch, critic, inputs, output):
    from megarm import generate

    calls = {"n": 0}
    real = generate.CritiqueWriter.critiques

    def crash_second(self, items):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, items)

    monkeypatch.setattr(generate.CritiqueWriter, "critiques", crash_second)
    with pytest.raises(KeyboardInterrupt):
        _generate(critic, inputs, output)
    monkeypatch.setattr(generate.CritiqueWriter, "critiques", real)


def test_resume_refuses_other_inputs_or_settings_and_survives_damage(
    critic, tmp_path, monkeypatch, capsys
):
    """Issue #25: a reordered input resumed with records lost and duplicated (exit 0);
    --seq-length and --truncation were not part of the resume key; a .partial cut
    inside a UTF-8 character, or a line without its index, gave a traceback."""
    inputs = tmp_path / "pairs.jsonl"
    inputs.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    assert _generate(critic, inputs, tmp_path / "whole.jsonl") == 0
    output = tmp_path / "out.jsonl"
    _crash_after_one_batch(monkeypatch, critic, inputs, output)
    partial = tmp_path / "out.jsonl.partial"
    good = partial.read_bytes()
    # Another order of the same records: refused, naming the inputs' contents.
    reordered = tmp_path / "reordered.jsonl"
    reordered.write_text("".join(json.dumps(r) + "\n" for r in RECORDS[::-1]))
    inputs.write_bytes(reordered.read_bytes())
    capsys.readouterr()
    assert _generate(critic, inputs, output) == 2
    assert "the input files' contents" in capsys.readouterr().err
    inputs.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    assert _generate(critic, inputs, output, "--seq-length", "200") == 2
    assert "seq_length was None, now 200" in capsys.readouterr().err
    # A cut multi-byte character, then a line without an index: resumed from there.
    partial.write_bytes(good + '{"index": 1, "prompt": "\u00e9'.encode()[:-1])
    assert _generate(critic, inputs, output) == 0
    assert output.read_text() == (tmp_path / "whole.jsonl").read_text()
    _crash_after_one_batch(monkeypatch, critic, inputs, tmp_path / "again.jsonl")
    again = tmp_path / "again.jsonl.partial"
    again.write_bytes(again.read_bytes() + b'{"prompt": "no index"}\n')
    assert _generate(critic, inputs, tmp_path / "again.jsonl") == 0
    assert (tmp_path / "again.jsonl").read_text() == (tmp_path / "whole.jsonl").read_text()


def test_a_record_too_long_is_skipped_and_bad_map_keys_are_one_line(critic, tmp_path, capsys):
    long = {"prompt": "Say something.", "chosen": "word " * 300, "rejected": "no"}
    inputs = tmp_path / "pairs.jsonl"
    inputs.write_text("".join(json.dumps(r) + "\n" for r in [*RECORDS[:2], long]))
    assert _generate(critic, inputs, tmp_path / "out.jsonl", "--seq-length", "120") == 0
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").open()]
    assert [line["index"] for line in lines] == [0, 1]
    err = capsys.readouterr().err
    assert "record 2: too_long" in err and "1 records skipped" in err
    assert _generate(critic, inputs, tmp_path / "x.jsonl", "--map-keys", "[1]") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --map-keys must be a JSON object") and "Traceback" not in err
