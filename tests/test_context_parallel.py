"""Context parallelism: CP=2 equals CP=1, in the split, in training and in scoring."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megarm.model.context_split import held_positions, locate, split_batch
from megarm.testing import run_distributed
from tests.helpers import load_full_state, pair_batch, randomize_, tiny_config

# Sequences of up to 384 tokens: with CP=2 each rank holds 2 of the 4 chunks of each
# of the micro-batch's 4 sequences (THD: every sequence cut on its own).
SEQ = 384
BASE = (
    "training.global_batch_size=4",
    "training.micro_batch_size=2",
    "training.train_iters=10",
    "training.eval_interval=0",
    "data.synthetic_num_pairs=48",
    f"data.seq_length={SEQ}",
    "model.max_position_embeddings=512",
    "data.split=100,0,0",
    "optimizer.lr=1e-3",
    "optimizer.lr_warmup_fraction=0.2",
    "optimizer.clip_grad=1.0",
    "logging.log_dir=null",
)


# --------------------------------------------------------------------------- the split


@pytest.mark.parametrize("size", [2, 3])
def test_held_positions_cover_every_position_once_and_locate_inverts_them(size):
    length = 2 * size * 5
    seen = np.concatenate([held_positions(length, r, size) for r in range(size)])
    assert sorted(seen.tolist()) == list(range(length))
    for rank in range(size):
        held = torch.from_numpy(held_positions(length, rank, size))
        owner, local = locate(held, length // (2 * size), size)
        assert owner.tolist() == [rank] * len(held)
        assert local.tolist() == list(range(len(held)))


def _lm(batch, rows: int):
    """Give a batch an LM target at every labelled position (flat ``pos * rows + row``)."""
    pos, row = torch.nonzero(batch.tokens.t() > 0, as_tuple=True)
    batch.lm_index = pos * rows + row
    batch.lm_target = batch.tokens.t()[pos, row]
    batch.lm_tokens = int(pos.numel())
    return batch


def test_padded_rows_split_keeps_every_token_reward_and_lm_position_once():
    batch = _lm(pair_batch(3, 30, 250, seed=2), rows=6)  # width 30 -> padded to 32
    size = 2
    shares = [split_batch(batch, r, size) for r in range(size)]
    full_lengths = batch.position_ids[torch.arange(6), batch.reward_index] + 1
    held_rewards = torch.zeros(6, dtype=torch.long)
    for rank, share in enumerate(shares):
        assert share.tokens.shape == (6, 16)
        keep = torch.from_numpy(held_positions(32, rank, size))
        padded = torch.nn.functional.pad(batch.tokens, (0, 2))
        assert torch.equal(share.tokens, padded[:, keep])
        assert torch.equal(share.position_ids, keep.expand(6, 16))
        assert torch.equal(share.lengths, full_lengths)
        mine = share.reward_index >= 0
        held_rewards += mine.long()
        # the held reward token is the sequence's last token
        rows = torch.arange(6)[mine]
        assert torch.equal(share.tokens[rows, share.reward_index[mine]],
                           batch.tokens[rows, batch.reward_index[mine]])
        got = share.tokens.t().reshape(-1)[share.lm_index]
        assert torch.equal(got, share.lm_target)
    assert held_rewards.tolist() == [1] * 6
    assert sum(s.lm_tokens for s in shares) == batch.lm_tokens


def test_thd_split_cuts_each_sequence_and_keeps_rewards_and_lm_positions():
    from megarm.data.packing import collate_thd
    from megarm.training.data import to_pair_batch

    gen = np.random.RandomState(0)
    samples = []
    for n in ((37, 20), (9, 54)):
        sample = {}
        for key, length in zip(("chosen", "rejected"), n, strict=True):
            ids = gen.randint(1, 250, length)
            sample[f"{key}_input_ids"] = ids
            sample[f"{key}_labels"] = ids
        samples.append(sample)
    batch = to_pair_batch(collate_thd(samples, 0, pad_to_multiple_of=2), lm=True)
    size, multiple = 2, 2
    shares = [split_batch(batch, r, size, multiple) for r in range(size)]
    # each segment padded to a multiple of 2 * CP * TP = 8
    assert shares[0].cu_seqlens.tolist() == [0, 40, 56, 80, 136]
    assert shares[0].seq_lengths == (20, 8, 12, 28)
    held = torch.zeros(4, dtype=torch.long)
    # (token at the supervised position, its target): the same set over the shares
    want = sorted(zip(batch.tokens[0, batch.lm_index].tolist(), batch.lm_target.tolist(), strict=True))
    got = []
    for share in shares:
        assert share.tokens.shape[1] == sum(share.seq_lengths)
        mine = share.reward_index >= 0
        held += mine.long()
        assert torch.equal(share.tokens[0, share.reward_index[mine]],
                           batch.tokens[0, batch.reward_index[mine]])
        got += zip(share.tokens[0, share.lm_index].tolist(), share.lm_target.tolist(), strict=True)
    assert sorted(got) == want
    assert held.tolist() == [1, 1, 1, 1]
    assert sum(s.lm_tokens for s in shares) == batch.lm_tokens


# --------------------------------------------------------------------------- multi-process


def _split_matches_megatron():
    """On a CP=2 group: the padded-rows split is megatron-core's own."""
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_batch_on_this_cp_rank

    from megarm import distributed

    distributed.init(context_parallel_size=2)
    batch = pair_batch(2, 32, 250, seed=3)
    mask = torch.rand(4, 1, 32, 32) > 0.5
    batch.attention_mask = mask
    batch.max_position = 31
    share = split_batch(batch, ps.get_context_parallel_rank(), 2)
    theirs = get_batch_on_this_cp_rank(
        {"tokens": batch.tokens.clone(), "position_ids": batch.position_ids.clone(),
         "attention_mask": mask.clone()}
    )
    return (
        torch.equal(share.tokens, theirs["tokens"])
        and torch.equal(share.position_ids, theirs["position_ids"])
        and torch.equal(share.attention_mask, theirs["attention_mask"])
    )


def test_padded_rows_split_is_megatron_cores():
    assert run_distributed(_split_matches_megatron, 2) == [True, True]


def _train(overrides: tuple[str, ...], full: dict[str, torch.Tensor] | None):
    """Train 10 iterations from known weights; return history (and the weights)."""
    from megarm import distributed
    from megarm.training.loop import Trainer

    cfg = tiny_config(*BASE, *overrides)
    distributed.init_from_config(cfg)
    trainer = Trainer(cfg)
    if full is None:
        full = randomize_(trainer.model[0].module.state_dict())
    load_full_state(trainer, full)
    trainer.train()
    keys = ("loss", "grad_norm", "accuracy", "tokens", "lm_loss")
    history = [{k: h[k] for k in keys if k in h} for h in trainer.history]
    return history, full


REFERENCES = {"rows": (), "thd": ("data.packing=true", "data.packed_format=thd"),
              "joint": ("training.objective=joint", "data.packing=true", "data.packed_format=thd")}


@pytest.fixture(scope="module")
def references():
    return {}


def _reference(references: dict, kind: str):
    if kind not in references:
        ((history, full),) = run_distributed(_train, 1, REFERENCES[kind], None)
        references[kind] = (history, full)
    return references[kind]


CP2 = ("parallel.context_parallel_size=2",)
LAYOUTS = [
    pytest.param("rows", 2, CP2, id="cp2-rows", marks=pytest.mark.slow),
    pytest.param("thd", 2, CP2, id="cp2-thd"),
    pytest.param("thd", 4, (*CP2, "parallel.tensor_model_parallel_size=2",
                            "parallel.sequence_parallel=true"), id="tp2-sp-cp2-thd", marks=pytest.mark.slow),
    pytest.param("rows", 4, (*CP2, "parallel.pipeline_model_parallel_size=2"), id="pp2-cp2-rows",
                 marks=pytest.mark.slow),
    pytest.param("thd", 4, (*CP2, "parallel.use_distributed_optimizer=true",
                            "training.micro_batch_size=1"), id="dp2-cp2-distopt-thd", marks=pytest.mark.slow),
    pytest.param("joint", 2, CP2, id="cp2-joint-thd", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("kind, world, overrides", LAYOUTS)
def test_context_parallel_trains_like_cp1(references, kind, world, overrides):
    expected, full = _reference(references, kind)
    results = run_distributed(_train, world, (*REFERENCES[kind], *overrides), full)
    for history, _ in results:  # every rank reports the same metrics
        first, ref = history[0], expected[0]
        assert math.isclose(first["loss"], ref["loss"], rel_tol=1e-6)
        assert math.isclose(first["grad_norm"], ref["grad_norm"], rel_tol=1e-6)
        assert first["tokens"] == ref["tokens"]
        for got, want in zip(history, expected, strict=True):
            assert abs(got["loss"] - want["loss"]) < 1e-5
            assert abs(got["grad_norm"] - want["grad_norm"]) < 1e-5
            if "lm_loss" in want:
                assert abs(got["lm_loss"] - want["lm_loss"]) < 1e-5


# --------------------------------------------------------------------------- resume


def _losses(overrides: tuple[str, ...]) -> tuple[int, list[float]]:
    from megarm import distributed
    from megarm.training.loop import Trainer

    cfg = tiny_config(*BASE, "training.train_iters=6", "data.packing=true", *overrides)
    distributed.init_from_config(cfg)
    trainer = Trainer(cfg)
    start = trainer.iteration
    trainer.train()
    return start, [h["loss"] for h in trainer.history]


@pytest.mark.slow
def test_cp2_resume_is_bitwise_and_a_cp2_checkpoint_resumes_at_cp1(tmp_path):
    (_, straight), _ = run_distributed(_losses, 2, CP2)
    save = f"checkpoint.save={tmp_path / 'ckpt'}"
    run_distributed(_losses, 2, (*CP2, save, "training.exit_interval=3"))
    load = f"checkpoint.load={tmp_path / 'ckpt'}"
    (start, rest), _ = run_distributed(_losses, 2, (*CP2, load))
    assert start == 3 and rest == straight[3:]  # bit for bit
    # The checkpoint has no CP dimension: one rank at CP=1 continues the same run.
    ((start, cp1),) = run_distributed(_losses, 1, (load,))
    assert start == 3
    assert math.isclose(cp1[0], straight[3], rel_tol=1e-6)
    assert all(abs(a - b) < 1e-5 for a, b in zip(cp1, straight[3:], strict=True))


# --------------------------------------------------------------------------- scoring


WORDS = ("alpha", "river", "stone", "garden", "signal", "copper", "window", "orbit", "lantern")


@pytest.fixture(scope="module")
def long_model(rm_tokenizer, tmp_path_factory):
    """A tiny HF reward model with 4096 positions, and its megarm checkpoint."""
    from tests.conftest import build_reward_model, convert_to_mcore

    base = tmp_path_factory.mktemp("long_rm")
    export = build_reward_model(base / "export", rm_tokenizer, max_positions=4096)
    return export, convert_to_mcore(export, base / "mcore")


def _score(argv: list[str]) -> int:
    from megarm.score import main

    return main(argv)


@pytest.mark.slow
@pytest.mark.parametrize("world, layout", [
    pytest.param(2, [], id="cp2"),
    pytest.param(4, ["--tensor-model-parallel-size", "2"], id="tp2-cp2"),
])
def test_score_at_cp2_equals_transformers_on_long_inputs(long_model, tmp_path, world, layout):
    import json
    import random

    from tests.test_score import transformers_rewards

    export, checkpoint = long_model
    rng = random.Random(7)
    rows = [
        {"prompt": " ".join(rng.choice(WORDS) for _ in range(n)),
         "chosen": " ".join(rng.choice(WORDS) for _ in range(40)),
         "rejected": " ".join(rng.choice(WORDS) for _ in range(25))}
        for n in (2200, 2700)
    ]
    data, out = tmp_path / "long.jsonl", tmp_path / "rewards.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["--load", str(checkpoint), "--input", str(data), "--output", str(out),
            "--context-parallel-size", "2", *layout]  # fmt: skip
    assert run_distributed(_score, world, argv) == [0] * world
    got = [(r["chosen_reward"], r["rejected_reward"]) for r in map(json.loads, out.open())]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(export)
    lengths = [len(tok.apply_chat_template([{"role": "user", "content": r["prompt"]},
                                            {"role": "assistant", "content": r["chosen"]}],
                                           tokenize=True, return_dict=True)["input_ids"])
               for r in rows]
    assert min(lengths) > 2000  # long enough that each CP rank holds real work
    for pair, want in zip(got, transformers_rewards(export, rows), strict=True):
        assert pair == pytest.approx(want, abs=1e-5)


# --------------------------------------------------------------------------- dispatch, config, memory


def test_te_attention_is_chosen_when_importable_and_given_the_cp_settings(monkeypatch):
    """With transformer-engine, its attention (and CP communication) runs: megarm
    hands it megatron-core's TE spec and the CP size and scheme in the config."""
    from megatron.core.models.common.embeddings import rope_utils

    from megarm import platform
    from megarm.model import builder
    from megarm.model.attention import SDPAttention

    calls = []
    monkeypatch.setattr(platform, "has_transformer_engine", lambda: True)
    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", lambda *a, **k: None, raising=False)
    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb_thd", lambda *a, **k: None, raising=False)
    monkeypatch.setattr(builder, "get_gpt_layer_with_transformer_engine_spec",
                        lambda *a, **k: calls.append((a, k)) or "te-spec")
    cfg = tiny_config(*CP2, "parallel.cp_comm_type=a2a", "data.packing=true", "data.packed_format=thd")
    assert builder.layer_spec(cfg) == "te-spec" and len(calls) == 1
    config = builder.transformer_config(cfg)
    assert (config.context_parallel_size, config.cp_comm_type) == (2, "a2a")
    # Packed rows need megarm's block mask: the local spec, with megarm's CP attention.
    rows = tiny_config(*CP2, "data.packing=true", "data.packed_format=rows")
    spec = builder.layer_spec(rows)
    assert spec.submodules.self_attention.submodules.core_attention is SDPAttention
    monkeypatch.setattr(platform, "has_transformer_engine", lambda: False)
    spec = builder.layer_spec(cfg)
    assert spec.submodules.self_attention.submodules.core_attention is SDPAttention


@pytest.mark.parametrize("overrides, key, fix", [
    (("data.seq_length=30",), "data.seq_length", "use 32"),
    (("parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true",
      "data.seq_length=36"), "data.seq_length", "use 40"),
    (("model.attention_backend=unfused",), "model.attention_backend", "auto"),
    (("parallel.context_parallel_size=0",), "parallel.context_parallel_size", ">= 1"),
])
def test_bad_cp_settings_are_refused_by_name(overrides, key, fix):
    from megarm.config.checks import validate

    problems = validate(tiny_config(*CP2, *overrides))
    assert key in [p.key for p in problems]
    assert fix in " ".join(p.message for p in problems if p.key == key)


def test_world_must_divide_by_tp_cp_pp_and_dp_excludes_cp():
    from megarm.config.checks import validate

    cfg = tiny_config(*CP2, "parallel.tensor_model_parallel_size=2",
                      "training.global_batch_size=4", "training.micro_batch_size=2")
    (problem,) = validate(cfg, world_size=6)
    assert problem.key == "parallel.context_parallel_size" and "TP x CP x PP" in problem.message
    assert validate(cfg, world_size=8) == []  # DP = 8 / (2 x 2) = 2: 4 = 2 x 2
    assert validate(cfg, world_size=4) == []


def test_memory_estimate_per_cp_rank():
    from megarm.training.memory import activation_bytes, estimate

    base = ("data.seq_length=8192", "model.max_position_embeddings=16384",
            "parallel.use_distributed_optimizer=true")
    one = tiny_config(*base)
    two = tiny_config(*base, *CP2)
    a1, a2 = activation_bytes(one, world_size=2), activation_bytes(two, world_size=2)
    # Half the tokens per rank, plus the gathered K/V of the whole sequence per layer.
    # K+V, 2 B (x2: fp32), tokens (2 pairs x 2 sides), KV heads, head dim, layers
    kv = 2 * 2 * 2 * (2 * 2 * 8192) * 2 * 16 * 4
    assert a2 == pytest.approx(a1 / 2 + kv, rel=1e-6)
    # The distributed optimizer shards over data x context ranks (DP=1, CP=2 here).
    assert estimate(two, 2).optimizer == pytest.approx(estimate(one, 2).optimizer, rel=1e-3)
    assert estimate(two, 2).optimizer == pytest.approx(estimate(one, 1).optimizer / 2, rel=1e-3)


@pytest.mark.parametrize("limit", [None, 100])
def test_a_causal_tail_equals_the_last_rows_of_full_causal_attention(monkeypatch, limit):
    """The CP chunk attention (queries at the end of a longer key range), whole or in
    query blocks (where the CPU would build the lower-right mask), equals the same
    rows of plain causal attention over the whole sequence."""
    from megatron.core.transformer.enums import AttnMaskType

    from megarm.model import attention
    from megarm.model.builder import transformer_config

    monkeypatch.setattr(attention, "max_mask_elements", lambda device: limit)
    core = attention.SDPAttention(transformer_config(tiny_config()), 1, AttnMaskType.causal, "self")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(48, 2, n, 16, generator=gen, requires_grad=True) for n in (4, 2, 2))
    full = core._attend(q, k, v, None, AttnMaskType.causal)
    tail = core._causal_tail(q[24:40], k, v, end=40)
    torch.testing.assert_close(tail, full[24:40], rtol=1e-6, atol=1e-6)
    # and the gradients (the CPU recomputes masked calls in the backward)
    weights = torch.randn(tail.shape, generator=gen)
    want = torch.autograd.grad((full[24:40] * weights).sum(), (q, k, v))
    got = torch.autograd.grad((tail * weights).sum(), (q, k, v))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- a 100k-token pair

LONG = 131072


def _long_forward(prefix: str, cp: int) -> list[float]:
    """One forward (CP=``cp``) of a 1-layer model over the preprocessed long pair."""
    from megarm import distributed
    from megarm.model.builder import build_model
    from megarm.model.step import run_schedule
    from megarm.training.data import build_datasets, micro_batches

    cfg = tiny_config(
        "model.num_layers=1", "model.hidden_size=16", "model.ffn_hidden_size=32",
        "model.num_attention_heads=2", "model.num_query_groups=1", "model.vocab_size=151936",
        f"model.max_position_embeddings={LONG}", f"data.seq_length={LONG}", f"data.data_path={prefix}",
        "data.split=100,0,0", "training.global_batch_size=1", "training.micro_batch_size=1",
        f"parallel.context_parallel_size={cp}",
    )
    distributed.init_from_config(cfg)
    (model,) = build_model(cfg)
    model.load_state_dict(randomize_(model.state_dict(), seed=5), strict=False)
    data = build_datasets(cfg)
    batch = next(micro_batches(data.train, cfg, data.pad_token_id, 0, 1, shuffle=False))
    with torch.no_grad():
        (out,) = run_schedule([model], [batch], forward_only=True)
    return out["rewards"].tolist()


@pytest.mark.slow
def test_a_100k_token_pair_preprocesses_checks_and_runs_at_cp2(rm_tokenizer, tmp_path):
    import json
    import random

    from megarm.data.integrity import read_stats
    from megarm.data.preprocess import main as preprocess
    from megarm.preflight import resolve

    rng = random.Random(3)
    record = {"prompt": " ".join(rng.choice(WORDS) for _ in range(49000)),
              "chosen": " ".join(rng.choice(WORDS) for _ in range(2000)),
              "rejected": " ".join(rng.choice(WORDS) for _ in range(1000))}
    raw = tmp_path / "long.jsonl"
    raw.write_text(json.dumps(record) + "\n")
    prefix = str(tmp_path / "data" / "long")
    assert preprocess(["--input", str(raw), "--output-prefix", prefix, "--tokenizer-name-or-path",
                       str(rm_tokenizer), "--handler-name", "pairwise_messages",
                       "--seq-length", str(LONG)]) == 0  # fmt: skip
    stats = read_stats(prefix)
    assert stats["counts"]["kept"] == 1 and stats["counts"]["truncated"] == 0, stats["counts"]
    assert sum(q["max"] for q in stats["lengths"].values()) > 100_000, stats["lengths"]
    # The start-up data checks accept it at this length and CP=2.
    resolve(None, [f"data.data_path={prefix}", f"data.seq_length={LONG}",
                   f"model.max_position_embeddings={LONG}", "model.vocab_size=151936",
                   "parallel.context_parallel_size=2", "training.global_batch_size=1",
                   "training.micro_batch_size=1"], world_size=2)
    cp2 = run_distributed(_long_forward, 2, prefix, 2)
    (cp1,) = run_distributed(_long_forward, 1, prefix, 1)
    assert cp2[0] == cp2[1]
    assert cp2[0] == pytest.approx(cp1, abs=1e-5)
