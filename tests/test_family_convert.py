"""Qwen3 and Llama 3.x end to end against transformers (fp32, CPU): tiny random HF
models (tied and untied embeddings, GQA and MQA and MHA, with and without Llama 3's
RoPE scaling, an explicit head_dim) converted by hf2mcore give transformers'
``*ForSequenceClassification`` rewards at TP/PP (1,1), (2,1), (1,2), (2,2) with left
and right padding; HF -> megarm -> HF is bit-identical; a TP=2 training run from
converted weights exports a model that transformers loads and that gives megarm's
rewards. Conversions and exports run in one process each; all layouts in one
4-rank run; both trainings in one 2-rank run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megarm.testing import run_distributed
from tests.test_convert import hf_rewards, load_hf_tensors, perturb_, token_batch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
VOCAB, PAD = 512, 511
ATOL = 1e-5
# Short contexts make Llama 3's scaling change the frequencies the 24-token batches
# use (with the published 8192 only wavelengths beyond 2048 positions move).
SCALED = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
MODELS = {
    # name: (model_type, KV heads, head_dim, tied, RoPE scaling)
    "qwen3": ("qwen3", 2, 32, False, None),  # head_dim 32 != hidden / heads = 16
    "qwen3-tied-mqa": ("qwen3", 1, 16, True, None),
    "llama3-mha": ("llama", 4, 16, False, None),
    "llama31": ("llama", 2, 16, False, SCALED),
    "llama32-tied": ("llama", 1, 16, True, {**SCALED, "factor": 32.0, "low_freq_factor": 2.0,
                                           "high_freq_factor": 8.0,
                                           "original_max_position_embeddings": 64}),
}
CAUSAL = ("qwen3-tied-mqa", "llama31")  # also converted from *ForCausalLM
TRAINED = ("qwen3", "llama31")


def hf_config(name: str, **extra):
    from transformers import AutoConfig

    model_type, kv, head_dim, tied, rope = MODELS[name]
    return AutoConfig.for_model(
        model_type, vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=kv, head_dim=head_dim,
        max_position_embeddings=256, rope_theta=10000.0,
        rms_norm_eps=1e-5 if model_type == "llama" else 1e-6, tie_word_embeddings=tied,
        pad_token_id=PAD, **({"rope_scaling": rope} if rope else {}), **extra,
    )


def make_hf(path: Path, name: str, kind: str, seed: int) -> Path:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    if kind == "seq":
        model = AutoModelForSequenceClassification.from_config(hf_config(name, num_labels=1))
    else:
        model = AutoModelForCausalLM.from_config(hf_config(name))
    perturb_(model, seed)
    model.save_pretrained(str(path))
    return path


def batch(left: bool, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged rows of up to 24 tokens padded with PAD (left or right)."""
    return token_batch(left, seed, lengths=(24, 9, 17, 3, 24, 12), pad=PAD)


def run_python(code: str) -> None:
    """``code`` in one fresh interpreter, as a user's process would run the tools."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]


def convert_all(pairs: list[tuple[Path, Path]], script: str, *extra: str) -> None:
    """ckpt_convert/<script> (``main``) for every (load, save) pair, in one process."""
    argvs = [["--load-dir", str(a), "--save-dir", str(b), *extra] for a, b in pairs]
    run_python(f"import sys; from ckpt_convert import {script} as s\n"
               f"sys.exit(max(s.main(a) for a in {argvs!r}))")


# --------------------------------------------------------------------------- rank bodies


def _rewards_at_every_layout(models: dict[str, str], batches: list, layouts: list) -> dict:
    """megarm's rewards for every model at every (TP, PP) of one 4-rank world (the
    rest is data parallelism, every DP replica scoring the same rows)."""
    from megatron.core import parallel_state
    from megatron.core.rerun_state_machine import destroy_rerun_state_machine

    from megarm import distributed
    from megarm.checkpoint import load_model_weights
    from megarm.config import load_config
    from megarm.model.builder import build_model
    from megarm.model.masks import padding_attention_mask
    from megarm.score import ScoreBatch, run_model
    from tests.helpers import last_valid_index

    out = {}
    for tp, pp in layouts:
        if parallel_state.model_parallel_is_initialized():
            # New model-parallel groups in the same world (the default group stays).
            parallel_state.destroy_model_parallel()
            destroy_rerun_state_machine()
        distributed.init(tp, pp)
        for name, mcore in models.items():
            cfg = load_config(None, [
                f"model.hf_config={mcore}", "model.params_dtype=fp32",
                f"parallel.tensor_model_parallel_size={tp}",
                f"parallel.pipeline_model_parallel_size={pp}",
            ])
            model = build_model(cfg)
            load_model_weights(mcore, model)
            for i, (tokens, valid, left) in enumerate(batches):
                rows = tokens.shape[0]
                found = run_model(model, [ScoreBatch(
                    tokens=tokens,
                    position_ids=torch.arange(tokens.shape[1]).expand_as(tokens).contiguous(),
                    reward_index=last_valid_index(valid),
                    rows=torch.arange(rows),
                    attention_mask=padding_attention_mask(valid) if left else None,
                )])
                if found:
                    out[(tp, pp, name, i)] = torch.tensor([found[r] for r in range(rows)])
    return out


def _train_at_tp2(runs: dict[str, tuple[str, str]], tokens: torch.Tensor, valid: torch.Tensor) -> dict:
    """Train each model a few steps at TP=2 from its converted weights, save, score."""
    from megarm import distributed
    from megarm.config import load_config
    from megarm.score import ScoreBatch, run_model
    from megarm.training.loop import Trainer
    from tests.helpers import last_valid_index

    distributed.init(2, 1)
    out = {}
    for name, (mcore, save) in runs.items():
        cfg = load_config(None, [
            f"model.hf_config={mcore}", "model.params_dtype=fp32",
            "parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true",
            f"checkpoint.load={mcore}", f"checkpoint.save={save}", "training.train_iters=3",
            "training.micro_batch_size=2", "training.global_batch_size=4", "optimizer.lr=1e-2",
            "optimizer.lr_warmup_fraction=0", "data.synthetic_num_pairs=16",
            "data.split=100,0,0", "data.seq_length=32",
        ])
        trainer = Trainer(cfg)
        trainer.train()
        found = run_model(trainer.model, [ScoreBatch(
            tokens=tokens,
            position_ids=torch.arange(tokens.shape[1]).expand_as(tokens).contiguous(),
            reward_index=last_valid_index(valid),
            rows=torch.arange(tokens.shape[0]),
        )])
        if found:
            out[name] = torch.tensor([found[r] for r in range(tokens.shape[0])])
    return out


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("families")


@pytest.fixture(scope="module")
def converted(work) -> dict[str, tuple[Path, Path]]:
    """name -> (HF *ForSequenceClassification dir, its megarm checkpoint); and
    ``causal:<name>`` for the *ForCausalLM inputs."""
    out = {}
    for seed, name in enumerate(MODELS, start=1):
        out[name] = (make_hf(work / f"hf-{name}", name, "seq", seed), work / f"mcore-{name}")
    for name in CAUSAL:
        hf = make_hf(work / f"hf-causal-{name}", name, "causal", 100)
        out[f"causal:{name}"] = (hf, work / f"mcore-causal-{name}")
    convert_all(list(out.values()), "hf2mcore", "--params-dtype", "fp32")
    return out


@pytest.fixture(scope="module")
def reference(converted) -> tuple[list, dict[str, list[torch.Tensor]]]:
    """The batches (right and left padding) and transformers' rewards for each."""
    batches = [(*batch(left), left) for left in (False, True)]
    expected = {name: [hf_rewards(converted[name][0], t, v) for t, v, _ in batches]
                for name in MODELS}
    return batches, expected


# --------------------------------------------------------------------------- tests


def test_rewards_equal_transformers_at_every_layout(converted, reference):
    batches, expected = reference
    layouts = [(1, 1), (2, 1), (1, 2), (2, 2)]
    models = {name: str(converted[name][1]) for name in MODELS}
    per_rank = run_distributed(_rewards_at_every_layout, 4, models, batches, layouts, timeout=900)
    worst = {}
    for tp, pp in layouts:
        for name in MODELS:
            for i, want in enumerate(expected[name]):
                got = [r[(tp, pp, name, i)] for r in per_rank if (tp, pp, name, i) in r]
                # (1,1) and (1,2): every DP replica's last stage; else TP rank 0's.
                assert len(got) == 4 // (tp * pp), (tp, pp, name)
                assert want.abs().max() > 0.1, "rewards too small to compare meaningfully"
                delta = max(float((g - want).abs().max()) for g in got)
                worst[name] = max(worst.get(name, 0.0), delta)
                assert delta <= ATOL, (tp, pp, name, "left" if batches[i][2] else "right", delta)
    print("max |reward - transformers'| per model:", json.dumps(worst))


def test_the_comparison_has_teeth(converted, reference):
    """transformers itself: without the RoPE scaling, or with left pads attended, the
    rewards differ far beyond the tolerance, so the equality above tests both."""
    from transformers import AutoModelForSequenceClassification

    batches, expected = reference
    model = AutoModelForSequenceClassification.from_pretrained(str(converted["llama31"][0]))
    model.config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    unscaled = type(model)(model.config)
    unscaled.load_state_dict(model.state_dict())
    tokens, valid, _ = batches[0]
    assert (hf_rewards(unscaled, tokens, valid) - expected["llama31"][0]).abs().max() > 1e-3
    tokens, valid, _ = batches[1]
    attended = hf_rewards(model, tokens, torch.ones_like(valid))
    assert (attended - expected["llama31"][1]).abs().max() > 1e-3


def test_hf_megarm_hf_is_bit_identical(converted, reference, work):
    from transformers import AutoModelForSequenceClassification

    batches, expected = reference
    pairs = {name: (converted[name][1], work / f"back-{name}") for name in converted}
    convert_all(list(pairs.values()), "mcore2hf")
    for name, (_, back) in pairs.items():
        hf, _ = converted[name]
        original, exported = load_hf_tensors(hf), load_hf_tensors(back)
        config = json.loads((back / "config.json").read_text())
        source = json.loads((hf / "config.json").read_text())
        assert config["model_type"] == source["model_type"]
        assert config["architectures"] == [source["architectures"][0].replace("ForCausalLM", "ForSequenceClassification")]
        assert config["rope_parameters"] == source["rope_parameters"], name
        for key in ("head_dim", "num_key_value_heads", "tie_word_embeddings", "rms_norm_eps"):
            assert config[key] == source[key], (name, key)
        if name.startswith("causal:"):
            trunk = {k for k in original if k != "lm_head.weight"}
            assert set(exported) == trunk | {"score.weight"}, name
        else:
            assert set(exported) == set(original), name
            trunk = set(original)
        for key in trunk:
            assert torch.equal(original[key], exported[key]), (name, key)
        model, loading = AutoModelForSequenceClassification.from_pretrained(
            str(back), output_loading_info=True
        )
        assert not any(loading.values()), (name, loading)
        if name in MODELS:
            for (tokens, valid, _), want in zip(batches, expected[name]):
                assert torch.equal(hf_rewards(model, tokens, valid), want), name


def test_training_at_tp2_exports_what_megarm_scores(converted, work):
    tokens, valid = batch(left=False, seed=11)
    runs = {name: (str(converted[name][1]), str(work / f"run-{name}")) for name in TRAINED}
    per_rank = run_distributed(_train_at_tp2, 2, runs, tokens, valid, timeout=900)
    trained = per_rank[0]
    assert sorted(trained) == sorted(TRAINED)
    exports = {name: (work / f"run-{name}", work / f"trained-{name}") for name in TRAINED}
    convert_all(list(exports.values()), "mcore2hf")
    for name, (_, out) in exports.items():
        got = hf_rewards(out, tokens, valid)
        delta = float((got - trained[name]).abs().max())
        print(f"{name}: max |transformers(export) - megarm(TP=2)| = {delta:.2e}")
        assert delta <= ATOL, (name, delta)
        before = hf_rewards(converted[name][0], tokens, valid)
        assert (before - trained[name]).abs().max() > 1e-3, "training moved no weight"
