"""Two reward-model traps of the ecosystem (issue 24, section 2), each with a test that
fails if it came back.

- **pad = end-of-turn** (transformers #35352): ``*ForSequenceClassification`` reads
  the score at the last token that is not ``pad_token_id``; a Llama 3 tokenizer padded
  with ``<|eot_id|>`` (its end of turn, where the reward is trained) makes it read the
  token before. The export declares a pad that ends nothing (``<|finetune_right_pad_id|>``)
  in config.json and in the tokenizer files; a right-padded batch of unequal lengths
  then gives each text's unpadded reward.
- **a re-initialised head** (ms-swift #9239): ``hf2mcore.py`` on a reward model keeps
  its ``score`` weights, its reward convention and its mean/std; the model training
  starts from gives the source's rewards, and its export the same statistics.

fp32 on CPU; conversions run as the user runs them (one process each).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megarm.testing import run_distributed
from tests.helpers import (
    LLAMA3_EOT,
    LLAMA3_PAD,
    LLAMA3_VOCAB,
    build_llama3_tokenizer,
    last_valid_index,
)
from tests.test_convert import hf_rewards, perturb_, token_batch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ATOL = 1e-5
CONVERSATIONS = [
    ("Hi", "Hello there, how can I help?"),
    ("What is two plus two?", "Four."),
    ("Name a colour.", "Blue, like the sky on a clear summer afternoon."),
    ("Say nothing.", "."),
]


def run_tools(*calls: tuple[str, list[str]]) -> None:
    """``ckpt_convert/<script>.main(argv)`` for each call, in one fresh interpreter."""
    code = "import sys\n" + "".join(
        f"from ckpt_convert import {script}\nassert {script}.main({argv!r}) == 0\n"
        for script, argv in calls
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]


# --------------------------------------------------------------------------- pad


def llama3_reward_model(path: Path) -> Path:
    """A tiny random LlamaForSequenceClassification with Llama 3's vocabulary and
    tokenizer, padded (as many Llama 3 reward setups do) with ``<|eot_id|>``."""
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    tokenizer = build_llama3_tokenizer(path / "tokenizer")
    config = LlamaConfig(
        vocab_size=LLAMA3_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rope_theta=500000.0, rms_norm_eps=1e-5, pad_token_id=LLAMA3_EOT, num_labels=1,
        bos_token_id=128000, eos_token_id=LLAMA3_EOT,
    )
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    perturb_(model, 5)
    model.save_pretrained(str(path / "hf"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / "hf" / name).write_bytes((tokenizer / name).read_bytes())
    return path / "hf"


def chat_ids(tokenizer, prompt: str, answer: str) -> list[int]:
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


def test_llama3_export_pads_with_a_token_that_ends_no_rewarded_sequence(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    hf = llama3_reward_model(tmp_path)
    mcore, export = tmp_path / "mcore", tmp_path / "export"
    run_tools(
        ("hf2mcore", ["--load-dir", str(hf), "--save-dir", str(mcore), "--params-dtype", "fp32"]),
        ("mcore2hf", ["--load-dir", str(mcore), "--save-dir", str(export)]),
    )
    config = json.loads((export / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(export))
    convention = config["reward_convention"]
    assert convention["reward_token_id"] == LLAMA3_EOT  # Llama 3 sequences end at <|eot_id|>
    assert config["pad_token_id"] == tokenizer.pad_token_id == LLAMA3_PAD
    assert tokenizer.pad_token == "<|finetune_right_pad_id|>"
    assert config["pad_token_id"] not in (LLAMA3_EOT, tokenizer.eos_token_id, 128001)

    model = AutoModelForSequenceClassification.from_pretrained(str(export), dtype=torch.float32).eval()
    seqs = [chat_ids(tokenizer, p, a) for p, a in CONVERSATIONS]
    assert all(seq[-1] == LLAMA3_EOT for seq in seqs) and len({len(s) for s in seqs}) == len(seqs)
    with torch.no_grad():
        alone = torch.cat([model(input_ids=torch.tensor([s])).logits[:, 0] for s in seqs])
        tokenizer.padding_side = "right"
        batch = tokenizer.pad({"input_ids": seqs}, return_tensors="pt")
        assert (batch["input_ids"][:, -1] == LLAMA3_PAD).sum() == len(seqs) - 1
        padded = model(**batch).logits[:, 0]
        # The trained position: the value at each text's last token (<|eot_id|>).
        assert (padded - alone).abs().max() <= ATOL, (padded, alone)
        # The trap, for teeth: declared pad = <|eot_id|> reads the token before it.
        model.config.pad_token_id = LLAMA3_EOT
        trapped = model(**{**batch, "input_ids": batch["input_ids"].masked_fill(
            batch["attention_mask"] == 0, LLAMA3_EOT)}).logits[:, 0]
    assert (trapped - alone).abs().min() > 1e-3


def test_a_pad_that_ends_turns_is_replaced_and_an_impossible_one_refused():
    """The choice itself: a safe own pad is kept; eos/end-of-turn/absent pads become
    the reserved token; ``--pad-token`` may name another; one that ends turns is refused."""
    from transformers import AutoTokenizer

    from megarm.data.templates import TemplateError, get_template, reward_convention, reward_pad

    root = Path(os.environ.get("TMPDIR", "/tmp")) / f"megarm-pads-{os.getpid()}"
    cases = {"<|eot_id|>": LLAMA3_PAD, "<|end_of_text|>": LLAMA3_PAD, None: LLAMA3_PAD,
             "<|reserved_special_token_5|>": 128013}
    for pad, want in cases.items():
        tok = AutoTokenizer.from_pretrained(str(build_llama3_tokenizer(root / str(pad), pad)))
        convention = reward_convention(get_template("auto", tok), tok)
        if pad == "<|end_of_text|>":
            tok.eos_token = "<|end_of_text|>"  # Llama 3 base: eos <|end_of_text|>
        assert reward_pad(tok, convention)[0] == want, pad
    assert reward_pad(tok, convention, "<|reserved_special_token_9|>")[:2] == (128017, "<|reserved_special_token_9|>")
    with pytest.raises(TemplateError, match="--pad-token '<|eot_id|>'"):
        reward_pad(tok, convention, "<|eot_id|>")


# --------------------------------------------------------------------------- head


def _rewards_training_starts_from(mcore: str, tokens: torch.Tensor, valid: torch.Tensor) -> list[float]:
    """The rewards of the model a training run from ``mcore`` starts with (TP=1)."""
    from megarm import distributed
    from megarm.config import load_config
    from megarm.score import ScoreBatch, run_model
    from megarm.training.loop import Trainer

    distributed.init(1, 1)
    cfg = load_config(None, [
        f"model.hf_config={mcore}", "model.params_dtype=fp32", f"checkpoint.load={mcore}",
        "training.train_iters=1", "training.micro_batch_size=2", "training.global_batch_size=2",
        "data.synthetic_num_pairs=8", "data.split=100,0,0", "data.seq_length=32",
    ])
    trainer = Trainer(cfg)
    found = run_model(trainer.model, [ScoreBatch(
        tokens=tokens,
        position_ids=torch.arange(tokens.shape[1]).expand_as(tokens).contiguous(),
        reward_index=last_valid_index(valid),
        rows=torch.arange(tokens.shape[0]),
    )])
    return [found[r] for r in range(tokens.shape[0])]


def test_continued_training_keeps_the_head_and_its_statistics(rm_export, tmp_path):
    from safetensors.torch import load_file

    from megarm.checkpoint.metadata import reward_info

    # A megarm-style reward model: score head, convention and statistics in config.json.
    source = tmp_path / "rm"
    source.mkdir()
    for path in rm_export.iterdir():
        (source / path.name).write_bytes(path.read_bytes())
    config = json.loads((source / "config.json").read_text())
    convention = {"sequence_end": "<|im_end|>\n", "end_of_turn": "<|im_end|>",
                  "reward_token_id": 198, "reward_position": "last token"}
    config.update(mean=0.75, std=2.5, reward_convention=convention, problem_type="regression")
    (source / "config.json").write_text(json.dumps(config))

    mcore, export = tmp_path / "mcore", tmp_path / "export"
    run_tools(
        ("hf2mcore", ["--load-dir", str(source), "--save-dir", str(mcore), "--params-dtype", "fp32"]),
        ("mcore2hf", ["--load-dir", str(mcore), "--save-dir", str(export)]),
    )
    info = reward_info(mcore)
    assert (info.convention, info.mean, info.std) == (convention, 0.75, 2.5)
    exported = json.loads((export / "config.json").read_text())
    assert (exported["reward_convention"], exported["mean"], exported["std"]) == (convention, 0.75, 2.5)
    assert torch.equal(load_file(str(export / "model.safetensors"))["score.weight"],
                       load_file(str(source / "model.safetensors"))["score.weight"])

    tokens, valid = token_batch(left=False, seed=3)
    want = hf_rewards(source, tokens, valid)
    (got,) = run_distributed(_rewards_training_starts_from, 1, str(mcore), tokens, valid, timeout=600)
    delta = float((torch.tensor(got) - want).abs().max())
    assert want.abs().max() > 0.1 and delta <= ATOL, delta
