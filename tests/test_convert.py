"""HF <-> megarm checkpoint conversion, and scoring, against transformers itself.

The HF models are tiny random Qwen2s (hidden 64, 4 layers, 4 heads / 2 KV heads,
QKV bias) with the real Qwen2.5 vocabulary (151,936) and every norm and bias
perturbed away from its init, so a misplaced or transposed tensor changes the
rewards. Everything is fp32 on CPU, the reference for equivalence (1e-5).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megarm.families.qwen2 import QWEN2
from megarm.testing import run_distributed

REPO = Path(__file__).resolve().parents[1]
VOCAB = 151936
PAD_ID = 151643  # Qwen2.5's <|endoftext|>, its pad token
HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 64, 4, 4, 2, 128
ATOL = 1e-5


# --------------------------------------------------------------------------- HF models


def qwen2_config(tied: bool = False, **extra):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=128,
        rope_theta=5e5,  # not the 1e6 default: a theta that is not carried over shows
        rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
        pad_token_id=PAD_ID,
        **extra,
    )


def perturb_(model: torch.nn.Module, seed: int) -> None:
    """Distinct values everywhere: norms around 1, biases and weights at useful scale."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=gen)
            if "norm" in name:
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                param.copy_(0.1 * noise)
            elif name == "score.weight":
                param.copy_(0.5 * noise)
            else:
                param.copy_(0.08 * noise)


def make_hf(path: Path, kind: str, tied: bool = False, seed: int = 0, **save_kwargs) -> Path:
    """Save a random ``Qwen2ForSequenceClassification`` ("seq") or ``Qwen2ForCausalLM``."""
    from transformers import Qwen2ForCausalLM, Qwen2ForSequenceClassification

    torch.manual_seed(seed)
    if kind == "seq":
        model = Qwen2ForSequenceClassification(qwen2_config(tied, num_labels=1))
    else:
        model = Qwen2ForCausalLM(qwen2_config(tied))
    perturb_(model, seed)
    model.save_pretrained(str(path), **save_kwargs)
    return path


def load_hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def hf_rewards(hf, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """transformers' rewards (it reads the rightmost non-pad token itself); ``hf`` is a
    model directory or a loaded model."""
    from transformers import AutoModelForSequenceClassification

    model = hf
    if isinstance(hf, Path):
        model = AutoModelForSequenceClassification.from_pretrained(str(hf), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens, attention_mask=valid.long()).logits[:, 0].float()


def token_batch(
    left: bool, seed: int = 7, lengths: tuple[int, ...] = (12, 7, 9, 3, 12, 5), pad: int = PAD_ID
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged rows padded with ``pad`` (left or right); real tokens never equal it."""
    gen = torch.Generator().manual_seed(seed)
    seq = max(lengths)
    tokens = torch.full((len(lengths), seq), pad, dtype=torch.long)
    valid = torch.zeros(len(lengths), seq, dtype=torch.bool)
    for i, n in enumerate(lengths):
        span = slice(seq - n, seq) if left else slice(0, n)
        tokens[i, span] = torch.randint(0, pad, (n,), generator=gen)
        valid[i, span] = True
    return tokens, valid


# --------------------------------------------------------------------------- scripts


def run_script(name: str, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    """``python ckpt_convert/<name> args`` as a user runs it."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, str(REPO / "ckpt_convert" / name), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(REPO),
        timeout=600,
    )
    if ok and proc.returncode != 0:
        raise AssertionError(f"{name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def hf2mcore(load: Path, save: Path, *extra: str, ok: bool = True) -> subprocess.CompletedProcess:
    return run_script(
        "hf2mcore.py",
        "--load-dir",
        str(load),
        "--save-dir",
        str(save),
        "--params-dtype",
        "fp32",
        *extra,
        ok=ok,
    )


def mcore2hf(load: Path, save: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_script("mcore2hf.py", "--load-dir", str(load), "--save-dir", str(save), *extra)


# --------------------------------------------------------------------------- rank bodies


def _megarm_rewards(mcore_dir: str, tp: int, pp: int, batches: list):
    """megarm's rewards for ``(tokens, valid, left)`` batches at TP x PP, loading the
    converted checkpoint with the config taken from it (``model.hf_config``)."""
    from megarm import distributed
    from megarm.checkpoint import load_model_weights
    from megarm.config import load_config
    from megarm.model.builder import build_model
    from megarm.model.masks import padding_attention_mask
    from megarm.score import ScoreBatch, run_model
    from tests.helpers import last_valid_index

    cfg = load_config(
        None,
        [
            f"model.hf_config={mcore_dir}",
            "model.params_dtype=fp32",
            f"parallel.tensor_model_parallel_size={tp}",
            f"parallel.pipeline_model_parallel_size={pp}",
            "data.seq_length=64",
        ],
    )
    distributed.init(tp, pp)
    model = build_model(cfg)
    load_model_weights(mcore_dir, model)
    out = []
    for tokens, valid, left in batches:
        rows = tokens.shape[0]
        batch = ScoreBatch(
            tokens=tokens,
            position_ids=torch.arange(tokens.shape[1]).expand_as(tokens).contiguous(),
            reward_index=last_valid_index(valid),
            rows=torch.arange(rows),
            # Right padding: plain causal attention is exact. Left: block pad keys.
            attention_mask=padding_attention_mask(valid) if left else None,
        )
        found = run_model(model, [batch])
        out.append(torch.tensor([found[r] for r in range(rows)]) if found else None)
    return out


def _train_and_score(mcore_dir: str, save_dir: str, tokens: torch.Tensor, valid: torch.Tensor):
    """Train a few steps at TP=2 PP=2 from the converted weights, save, and score."""
    from megarm import distributed
    from megarm.config import load_config
    from megarm.score import ScoreBatch, run_model
    from megarm.training.loop import Trainer
    from tests.helpers import last_valid_index

    cfg = load_config(
        None,
        [
            f"model.hf_config={mcore_dir}",
            "model.params_dtype=fp32",
            "parallel.tensor_model_parallel_size=2",
            "parallel.pipeline_model_parallel_size=2",
            f"checkpoint.load={mcore_dir}",
            f"checkpoint.save={save_dir}",
            "training.train_iters=3",
            "training.micro_batch_size=1",
            "training.global_batch_size=2",
            "optimizer.lr=1e-2",
            "optimizer.lr_warmup_fraction=0",
            "data.synthetic_num_pairs=16",
            "data.split=100,0,0",
            "data.seq_length=32",
        ],
    )
    distributed.init(2, 2)
    trainer = Trainer(cfg)
    trainer.train()
    batch = ScoreBatch(
        tokens=tokens,
        position_ids=torch.arange(tokens.shape[1]).expand_as(tokens).contiguous(),
        reward_index=last_valid_index(valid),
        rows=torch.arange(tokens.shape[0]),
    )
    found = run_model(trainer.model, [batch])
    return torch.tensor([found[r] for r in range(tokens.shape[0])]) if found else None


def _score_main(argv: list[str]) -> int:
    from megarm.score import main

    return main(argv)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def seq_model(tmp_path_factory) -> Path:
    """A Qwen2ForSequenceClassification (num_labels=1) HF directory."""
    return make_hf(tmp_path_factory.mktemp("hf") / "seq", "seq", seed=1)


@pytest.fixture(scope="module")
def seq_mcore(seq_model, tmp_path_factory) -> Path:
    """``seq_model`` converted to torch_dist."""
    out = tmp_path_factory.mktemp("mcore") / "seq"
    hf2mcore(seq_model, out)
    return out


@pytest.fixture(scope="module")
def hf_reference(seq_model):
    """transformers' rewards on the right- and left-padded batches."""
    result = {}
    for left in (False, True):
        tokens, valid = token_batch(left)
        result[left] = (tokens, valid, hf_rewards(seq_model, tokens, valid))
    return result


# --------------------------------------------------------------------------- mapping


def test_qkv_grouping_is_the_documented_layout_and_inverts():
    from ckpt_convert.mapping import group_qkv, split_qkv
    from megarm.families import Shape

    shape = Shape(2, HIDDEN, FFN, HEADS, KV_HEADS, 16, 250, 256)
    nh, ng, d, h = HEADS, KV_HEADS, 16, HIDDEN
    q, k, v = torch.randn(nh * d, h), torch.randn(ng * d, h), torch.randn(ng * d, h)
    grouped = group_qkv(q, k, v, shape)
    expected = torch.cat(
        [q.view(ng, nh // ng * d, h), k.view(ng, d, h), v.view(ng, d, h)], dim=1
    ).reshape(-1, h)
    assert torch.equal(grouped, expected)
    # Group g holds its query heads, then its key head, then its value head.
    per = (nh // ng + 2) * d
    assert torch.equal(grouped[per : per + 2 * d], q[2 * d : 4 * d])
    assert torch.equal(grouped[per + 2 * d : per + 3 * d], k[d : 2 * d])
    for a, b in zip(split_qkv(grouped, shape), (q, k, v)):
        assert torch.equal(a, b)
    qb, kb, vb = torch.randn(nh * d), torch.randn(ng * d), torch.randn(ng * d)
    for a, b in zip(split_qkv(group_qkv(qb, kb, vb, shape), shape), (qb, kb, vb)):
        assert torch.equal(a, b)


def test_mapping_covers_every_hf_tensor_and_pads_the_vocabulary():
    from transformers import Qwen2ForSequenceClassification

    from ckpt_convert.mapping import to_hf, to_mcore
    from megarm.families import Shape

    def entries(layers, with_score, spec="local"):
        return QWEN2.entries(layers, ("value",) if with_score else (), spec)

    config = qwen2_config(num_labels=1)
    config.vocab_size, config.pad_token_id = 250, 0
    model = Qwen2ForSequenceClassification(config)
    shape = Shape(LAYERS, HIDDEN, FFN, HEADS, KV_HEADS, HIDDEN // HEADS, 250, 256)
    hf = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert hf == QWEN2.hf_shapes(shape, ("value",))
    listed = [name for e in entries(LAYERS, with_score=True) for name in e.hf]
    assert sorted(listed) == sorted(hf)
    (embedding,) = [e for e in entries(LAYERS, True) if e.kind == "vocab-pad"]
    emb = torch.randn(250, HIDDEN)
    padded = to_mcore(embedding, [emb], shape)
    assert padded.shape == (256, HIDDEN) and not padded[250:].any()
    assert torch.equal(to_hf(embedding, padded, shape)[0], emb)
    te_names = {e.mcore for e in entries(1, True, spec="te")}
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in te_names
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in te_names


def test_padding_mask_blocks_pad_keys_and_never_a_whole_row():
    from megarm.model.masks import padding_attention_mask
    from tests.helpers import last_valid_index

    valid = torch.tensor([[False, False, True, True], [True, True, True, False]])
    mask = padding_attention_mask(valid)
    assert mask.shape == (2, 1, 4, 4)
    assert not mask.all(dim=-1).any(), "a fully blocked query row gives NaN in softmax"
    # Real queries: causal, never a pad key.
    assert mask[0, 0, 3].tolist() == [True, True, False, False]
    assert mask[1, 0, 1].tolist() == [False, False, True, True]
    assert last_valid_index(valid).tolist() == [3, 2]


# --------------------------------------------------------------------------- errors


def _fake_hf_dir(path: Path, **config_changes) -> Path:
    """config.json of a real shape, but a weight file that is not safetensors at all:
    any attempt to read weights fails with a different error."""
    path.mkdir(parents=True)
    config = qwen2_config(num_labels=1).to_dict()
    config["architectures"] = ["Qwen2ForSequenceClassification"]
    config.update(config_changes)
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").write_bytes(b"\xff" * 64)
    return path


def test_layout_errors_come_before_any_weight_is_read(tmp_path, capsys, monkeypatch):
    import safetensors

    from ckpt_convert import hf2mcore as script

    def forbidden(*args, **kwargs):
        raise AssertionError("a weight file was opened")

    monkeypatch.setattr(safetensors, "safe_open", forbidden)
    hf_dir = _fake_hf_dir(tmp_path / "hf")
    out = tmp_path / "out"
    common = ["--load-dir", str(hf_dir), "--save-dir", str(out)]
    assert script.main([*common, "--target-tensor-parallel-size", "4"]) == 2
    # The config validator's layout rules and words (megarm.config.layout_issues).
    err = capsys.readouterr().err
    assert "tensor-parallel size 4" in err and "2 KV heads" in err and "Allowed: 1, 2" in err
    assert script.main([*common, "--target-pipeline-parallel-size", "3"]) == 2
    err = capsys.readouterr().err
    assert "pipeline-parallel size 3" in err and "4 layers" in err and "allowed PP: 1, 2, 4" in err
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_unsupported_inputs_are_refused_by_name(tmp_path, capsys, monkeypatch):
    import safetensors

    from ckpt_convert import hf2mcore as script

    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: pytest.fail("opened"))
    cases = {
        "labels": ({"id2label": {"0": "A", "1": "B"}}, "num_labels=2"),
        # (Llama is a family now: its refusals are in tests/test_families.py.)
        "arch": ({"architectures": ["GemmaForCausalLM"]}, "'GemmaForCausalLM' is not supported"),
        "window": ({"use_sliding_window": True}, "use_sliding_window"),
        "yarn": (
            {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}},
            "RoPE type 'yarn'",
        ),
    }
    for name, (changes, message) in cases.items():
        hf_dir = _fake_hf_dir(tmp_path / name, **changes)
        code = script.main(["--load-dir", str(hf_dir), "--save-dir", str(tmp_path / f"o{name}")])
        err = capsys.readouterr().err
        assert code == 2 and message in err, (name, err)


# --------------------------------------------------------------------------- HF <-> mcore


def test_sequence_classification_round_trip_is_bit_identical(seq_model, seq_mcore, tmp_path):
    from transformers import AutoModelForSequenceClassification

    info = json.loads((seq_mcore / "megarm_model.json").read_text())
    assert info["architecture"] == "Qwen2ForSequenceClassification"
    assert info["value_head"].startswith("score.weight")
    assert (seq_mcore / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    assert json.loads((seq_mcore / "config.json").read_text())["vocab_size"] == VOCAB
    back = tmp_path / "hf_back"
    mcore2hf(seq_mcore, back)
    original, exported = load_hf_tensors(seq_model), load_hf_tensors(back)
    assert sorted(original) == sorted(exported)
    for name, tensor in original.items():
        assert torch.equal(tensor, exported[name]), name
    config = json.loads((back / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForSequenceClassification"]
    assert config["pad_token_id"] == PAD_ID and len(config["id2label"]) == 1
    _, loading = AutoModelForSequenceClassification.from_pretrained(
        str(back), output_loading_info=True
    )
    assert not loading["missing_keys"] and not loading["unexpected_keys"]
    assert not loading["mismatched_keys"]


def test_rewards_match_transformers_at_tp1_pp1(seq_mcore, hf_reference):
    batches = [(tokens, valid, left) for left, (tokens, valid, _) in hf_reference.items()]
    # The comparison has teeth: causal-only attention over left pads must differ.
    left_tokens, left_valid, left_expected = hf_reference[True]
    batches.append((left_tokens, left_valid, False))
    (got,) = run_distributed(_megarm_rewards, 1, str(seq_mcore), 1, 1, batches)
    for (left, (_, _, expected)), rewards in zip(hf_reference.items(), got):
        assert expected.abs().max() > 0.1, "rewards too small to compare meaningfully"
        torch.testing.assert_close(rewards, expected, rtol=0, atol=ATOL, msg=f"left={left}")
    assert (got[2] - left_expected).abs().max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2), (2, 2)], ids=["tp2", "pp2", "tp2-pp2"])
def test_rewards_match_transformers_at_any_layout(seq_mcore, hf_reference, tp, pp):
    batches = [(tokens, valid, left) for left, (tokens, valid, _) in hf_reference.items()]
    per_rank = run_distributed(_megarm_rewards, tp * pp, str(seq_mcore), tp, pp, batches)
    results = [r for r in per_rank if r[0] is not None]
    assert len(results) == 1, "exactly one rank (TP 0 of the last stage) holds rewards"
    for (left, (_, _, expected)), rewards in zip(hf_reference.items(), results[0]):
        torch.testing.assert_close(rewards, expected, rtol=0, atol=ATOL, msg=f"left={left}")


@pytest.mark.slow
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_causal_lm_round_trip_keeps_the_trunk(tmp_path, tied):
    from megarm.model.reward_model import init_value_head

    hf_dir = make_hf(tmp_path / "hf", "causal", tied=tied, seed=2)
    original = load_hf_tensors(hf_dir)
    assert ("lm_head.weight" in original) == (not tied)
    proc = hf2mcore(hf_dir, tmp_path / "mcore")
    assert "value head initialised" in proc.stderr
    mcore2hf(tmp_path / "mcore", tmp_path / "back")
    exported = load_hf_tensors(tmp_path / "back")
    trunk = {name for name in original if name != "lm_head.weight"}
    assert set(exported) == trunk | {"score.weight"}
    for name in trunk:
        assert torch.equal(original[name], exported[name]), name
    head = torch.empty(1, HIDDEN)
    init_value_head(head, HIDDEN, 1234)  # hf2mcore's default --seed
    assert torch.equal(exported["score.weight"], head)
    from transformers import AutoModelForSequenceClassification

    _, loading = AutoModelForSequenceClassification.from_pretrained(
        str(tmp_path / "back"), output_loading_info=True
    )
    assert not loading["missing_keys"] and not loading["unexpected_keys"]


@pytest.mark.slow
def test_legacy_format_shards_and_every_input_format(seq_model, tmp_path):
    """legacy mp_rank files hold exactly megarm's TP/PP shards; a sharded safetensors
    input (with index) and a pytorch_model.bin input convert to the same weights."""
    from ckpt_convert.mapping import group_qkv
    from megarm.families import Shape
    from megarm.model.sharding import shard_state_dict

    def legacy(path: Path, rank_dir: str) -> dict[str, torch.Tensor]:
        file = path / "iter_0000000" / rank_dir / "model_optim_rng.pt"
        saved = torch.load(file, weights_only=False)
        assert saved["checkpoint_version"] == 3.0 and saved["iteration"] == 0
        return saved["model"]

    hf2mcore(seq_model, tmp_path / "tp1", "--format", "legacy")
    full = legacy(tmp_path / "tp1", "mp_rank_00")
    hf = load_hf_tensors(seq_model)
    shape = Shape(LAYERS, HIDDEN, FFN, HEADS, KV_HEADS, HIDDEN // HEADS, VOCAB, VOCAB)
    qkv = [hf[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"]
    assert torch.equal(
        full["decoder.layers.1.self_attention.linear_qkv.weight"], group_qkv(*qkv, shape)
    )
    assert torch.equal(full["value_head.weight"], hf["score.weight"])

    hf2mcore(
        seq_model,
        tmp_path / "tp2pp2",
        "--format",
        "legacy",
        "--target-tensor-parallel-size",
        "2",
        "--target-pipeline-parallel-size",
        "2",
    )
    for tp_rank in range(2):
        for pp_rank in range(2):
            got = legacy(tmp_path / "tp2pp2", f"mp_rank_{tp_rank:02d}_{pp_rank:03d}")
            want = shard_state_dict(full, LAYERS, tp_rank, 2, pp_rank, 2)
            assert sorted(got) == sorted(want)
            for name in want:
                assert torch.equal(got[name], want[name]), (tp_rank, pp_rank, name)

    # The same model saved as sharded safetensors and as pytorch_model.bin.
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(seq_model))
    model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="10MB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((seq_model / "config.json").read_text())
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    for source in ("sharded", "bin"):
        out = tmp_path / f"from_{source}"
        hf2mcore(tmp_path / source, out, "--format", "legacy")
        again = legacy(out, "mp_rank_00")
        assert sorted(again) == sorted(full)
        for name in full:
            assert torch.equal(again[name], full[name]), (source, name)


@pytest.mark.slow
def test_model_trained_at_tp2_pp2_exports_the_rewards_megarm_gave(seq_model, seq_mcore, tmp_path):
    tokens, valid = token_batch(left=False, seed=11)
    per_rank = run_distributed(
        _train_and_score, 4, str(seq_mcore), str(tmp_path / "run"), tokens, valid
    )
    (trained,) = [r for r in per_rank if r is not None]
    assert (tmp_path / "run" / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    out = tmp_path / "hf"
    # A small shard size: the embedding alone is ~39 MB, so several files and an index.
    mcore2hf(tmp_path / "run", out, "--max-shard-size", "20MB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    torch.testing.assert_close(hf_rewards(out, tokens, valid), trained, rtol=0, atol=ATOL)
    # Training moved the weights: the export is not just the converted input again.
    assert (hf_rewards(seq_model, tokens, valid) - trained).abs().max() > 1e-3


# --------------------------------------------------------------------------- scoring


PAIRS = [
    {"prompt": "What is 2+2?", "chosen": "4.", "rejected": "Five, probably."},
    {"prompt": "Name a colour.", "chosen": "Blue", "rejected": "Seven"},
    {"prompt": "Say hi.", "chosen": "Hi there! How can I help?", "rejected": "no"},
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}],
        "chosen": "Because.",
        "rejected": "I will not answer that question at any length.",
    },
    {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon"},
]
SINGLES = [{"prompt": "Tell me a joke.", "response": "A pun walks into a bar."}]


def _reference_rows(tokenizer, record: dict) -> list[list[int]]:
    """Token rows built independently of megarm: the tokenizer's own chat template
    for the prompt, then the response and ``<|im_end|>\\n`` (the end of the template's
    assistant turn), tokenized separately."""
    prompt = record["prompt"]
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    head = tokenizer(text, add_special_tokens=False)["input_ids"]
    responses = (
        [record["response"]]
        if "response" in record
        else [record[k] for k in ("chosen", "rejected")]
    )
    return [
        head + tokenizer(r + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
        for r in responses
    ]


@pytest.mark.slow
def test_score_pair_accuracy_equals_transformers(seq_model, tmp_path):
    from transformers import AutoTokenizer

    from megarm.data.tokenizer import build_qwen25_tokenizer

    tok_dir = build_qwen25_tokenizer(tmp_path / "tokenizer")
    mcore = tmp_path / "mcore"
    hf2mcore(seq_model, mcore, "--tokenizer-model", str(tok_dir))
    assert (mcore / "tokenizer.json").is_file()
    records = PAIRS + SINGLES
    data = tmp_path / "pairs.jsonl"
    lines = [json.dumps(r) for r in records] + ["{not json"]
    data.write_text("\n".join(lines) + "\n")
    output = tmp_path / "rewards.jsonl"
    argv = [
        "--load",
        str(mcore),
        "--input",
        str(data),
        "--output",
        str(output),
        "--pipeline-model-parallel-size",
        "2",
        "--micro-batch-size",
        "3",
    ]
    assert run_distributed(_score_main, 2, argv) == [0, 0]
    scored = [json.loads(line) for line in output.read_text().splitlines()]
    assert [s["index"] for s in scored] == list(range(len(records) + 1))
    assert scored[-1]["error"].startswith("malformed_json")

    from transformers import AutoModelForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(seq_model))
    expected = []
    for record in records:
        rewards = []
        for row in _reference_rows(tokenizer, record):
            ids = torch.tensor([row])
            rewards.append(float(hf_rewards(model, ids, torch.ones_like(ids, dtype=torch.bool))[0]))
        expected.append(rewards)
    correct_hf = correct_megarm = 0
    for record, got, want in zip(records, scored, expected):
        if "response" in record:
            assert abs(got["reward"] - want[0]) < ATOL
            continue
        assert abs(got["chosen_reward"] - want[0]) < ATOL
        assert abs(got["rejected_reward"] - want[1]) < ATOL
        correct_hf += want[0] > want[1]
        correct_megarm += got["chosen_reward"] > got["rejected_reward"]
    assert correct_megarm == correct_hf


# --------------------------------------------------------------------------- memory

# A ~1 GB fp32 model in 100 MB shards: 16 layers of 61 MB, a small vocabulary so no
# single tensor dominates. Converting it whole would cost over 1 GB above the
# libraries' own footprint; streaming costs about one shard plus one layer.
BIG = dict(
    hidden_size=1024,
    num_layers=16,
    ffn_hidden_size=4096,
    num_attention_heads=8,
    num_query_groups=2,
    vocab_size=4096,
    max_shard_size="100MB",
)
MEMORY_BUDGET = 400 * 2**20


@pytest.mark.slow
def test_conversion_memory_is_one_shard_not_the_model(tmp_path):
    from safetensors import safe_open

    from ckpt_convert.random_qwen2 import CONVERTER_IMPORTS, write_random_qwen2
    from megarm.platform.host import measure_peak_rss

    info = write_random_qwen2(tmp_path / "hf", **BIG)
    assert info["total_bytes"] > 0.95e9 and info["largest_shard_bytes"] < 110e6
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    script = REPO / "ckpt_convert"
    base, _, _ = measure_peak_rss(["-c", CONVERTER_IMPORTS], env=env)
    to_mcore, _, _ = measure_peak_rss(
        [str(script / "hf2mcore.py"), "--load-dir", str(tmp_path / "hf"),
         "--save-dir", str(tmp_path / "mcore"), "--params-dtype", "fp32"],
        env=env,
    )
    to_hf, _, _ = measure_peak_rss(
        [str(script / "mcore2hf.py"), "--load-dir", str(tmp_path / "mcore"),
         "--save-dir", str(tmp_path / "back"), "--max-shard-size", "100MB"],
        env=env,
    )
    mib = 2**20
    assert to_mcore - base < MEMORY_BUDGET, (
        f"hf2mcore peak {to_mcore / mib:.0f} MiB, baseline {base / mib:.0f} MiB, "
        f"model {info['total_bytes'] / mib:.0f} MiB"
    )
    assert to_hf - base < MEMORY_BUDGET, (
        f"mcore2hf peak {to_hf / mib:.0f} MiB, baseline {base / mib:.0f} MiB"
    )
    # And the streamed round trip is exact (every tensor but the dropped LM head).
    back = load_hf_tensors(tmp_path / "back")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    compared = 0
    for name, file in index["weight_map"].items():
        if name == "lm_head.weight":
            continue
        with safe_open(str(tmp_path / "hf" / file), framework="pt") as handle:
            assert torch.equal(handle.get_tensor(name), back[name]), name
        compared += 1
    assert compared == len(back) - 1  # all but score.weight (the fresh value head)
