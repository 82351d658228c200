"""Critique models through the converters: ``hf2mcore.py --keep-lm-head`` keeps the LM
head (or the tied embedding) as megarm's output layer, and megarm's logits at the
supervised positions equal transformers' at TP x PP = (1,1), (2,1), (1,2), (2,2), tied
and untied (fp32, 1e-5); ``mcore2hf.py`` exports a critique model as a causal LM and a
sequence classifier sharing the trunk, which reproduce megarm's LM loss and rewards in
transformers."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import pytest
import torch

from megarm.testing import run_distributed
from tests.test_convert import ATOL, PAD_ID, hf2mcore, load_hf_tensors, make_hf, mcore2hf

ROWS, SEQ = 4, 14


def _sequences(seed: int = 11) -> list[dict]:
    """Ragged SFT records (a masked prompt, then supervised tokens); ids never PAD_ID."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for length, prompt in zip((14, 9, 11, 6), (5, 3, 7, 2), strict=True):
        ids = torch.randint(0, PAD_ID, (length,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def _pairs() -> list[dict]:
    seqs = _sequences()
    return [
        {"chosen_input_ids": a["input_ids"], "chosen_labels": a["labels"],
         "rejected_input_ids": b["input_ids"], "rejected_labels": b["labels"], "margin": 0.0}
        for a, b in ((seqs[0], seqs[1]), (seqs[2], seqs[3]))
    ]


def _megarm_lm(mcores: dict[bool, str], tp: int, pp: int) -> dict:
    """megarm's logits at the supervised positions (gathered over TP ranks) for each
    converted model at TP x PP; at (1,1) also the joint model's LM loss and rewards."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megarm import distributed
    from megarm.checkpoint import load_model_weights
    from megarm.config import load_config
    from megarm.data.dataset import collate_pairs
    from megarm.model.builder import build_model
    from megarm.model.step import forward_step
    from megarm.training.data import to_pair_batch
    from megarm.training.loss import STAT_KEYS, loss_func

    distributed.init(tp, pp)
    last = ps.is_pipeline_last_stage()
    out: dict = {}
    for tied, mcore in mcores.items():
        for objective in ("sft", "joint") if (tp, pp) == (1, 1) and not tied else ("sft",):
            cfg = load_config(None, [
                f"model.hf_config={mcore}", "model.params_dtype=fp32", "data.seq_length=64",
                f"parallel.tensor_model_parallel_size={tp}",
                f"parallel.pipeline_model_parallel_size={pp}", f"training.objective={objective}",
            ])
            model = build_model(cfg)
            load_model_weights(mcore, model)
            samples = _sequences() if objective == "sft" else _pairs()
            batch = to_pair_batch(collate_pairs(samples, PAD_ID), lm=True)
            batch.lm_scale = 1.0 / batch.lm_tokens  # the loss is then the token mean
            captured: list[torch.Tensor] = []
            if last:  # a copy: the cross-entropy works on the logits in place
                model[-1].output_layer.register_forward_hook(
                    lambda m, i, o, into=captured: into.append(o[0].detach().clone())
                )
            with torch.no_grad():
                outputs = get_forward_backward_func()(
                    forward_step_func=partial(forward_step, loss=partial(loss_func, rm_weight=0.7, lm_weight=0.3)),
                    data_iterator=iter([batch]), model=model[0], num_microbatches=1,
                    seq_length=batch.tokens.shape[1], micro_batch_size=batch.tokens.shape[0],
                    forward_only=True,
                )
            shards = distributed.all_gather_objects(
                (ps.get_tensor_model_parallel_rank(), captured[0][:, 0]) if captured else None
            )
            parts = sorted(s for s in shards if s is not None)
            result = {
                "logits": torch.cat([p[1] for p in parts], dim=-1),
                "index": batch.lm_index, "target": batch.lm_target,
            }
            if objective == "joint" and outputs:
                stats = dict(zip(STAT_KEYS, outputs[0]["stats"].tolist(), strict=True))
                result.update(lm_loss=stats["lm_loss_sum"] / stats["lm_tokens"],
                              rewards=outputs[0]["rewards"])
            out[(tied, objective)] = result
    return out


def _tokens(samples: list[dict], keys: tuple[str, str] = ("input_ids", "labels")):
    rows = [(s[keys[0]], s[keys[1]]) for s in samples]
    tokens = torch.full((len(rows), SEQ), PAD_ID)
    labels = torch.full((len(rows), SEQ), -100)
    for i, (ids, lab) in enumerate(rows):
        tokens[i, : len(ids)], labels[i, : len(ids)] = torch.tensor(ids), torch.tensor(lab)
    return tokens, labels, tokens != PAD_ID


@pytest.fixture(scope="module")
def critique_models(tmp_path_factory):
    """Tied and untied random Qwen2ForCausalLMs, converted with --keep-lm-head, and
    transformers' logits on the SFT records."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("critique")
    models, mcores, logits = {}, {}, {}
    tokens, _, valid = _tokens(_sequences())
    for tied in (False, True):
        hf = make_hf(root / f"hf-{tied}", "causal", tied=tied, seed=3 + tied)
        proc = hf2mcore(hf, root / f"mcore-{tied}", "--keep-lm-head")
        assert "keeping the LM head" in proc.stderr
        models[tied], mcores[tied] = hf, str(root / f"mcore-{tied}")
        model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
        with torch.no_grad():
            logits[tied] = model(input_ids=tokens, attention_mask=valid.long()).logits
    return root, models, mcores, logits


LAYOUTS = [
    pytest.param(1, 1, id="tp1-pp1", marks=pytest.mark.slow),
    pytest.param(2, 1, id="tp2", marks=pytest.mark.slow),
    pytest.param(1, 2, id="pp2", marks=pytest.mark.slow),
    pytest.param(2, 2, id="tp2-pp2", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("tp, pp", LAYOUTS)
def test_logits_at_supervised_positions_match_transformers(critique_models, tp, pp):
    _, _, mcores, hf_logits = critique_models
    per_rank = run_distributed(_megarm_lm, tp * pp, mcores, tp, pp)
    for tied in (False, True):
        got = per_rank[-1][(tied, "sft")]
        index = got["index"]
        rows, positions = index % ROWS, index // ROWS
        want = hf_logits[tied][rows, positions]
        assert got["logits"].shape == want.shape  # Qwen's vocabulary needs no padding
        torch.testing.assert_close(got["logits"], want, rtol=0, atol=ATOL)
        # The positions are those before each supervised token, the targets those tokens.
        _, labels, _ = _tokens(_sequences())
        assert torch.equal(got["target"], labels[rows, positions + 1])
        assert len(index) == int((labels != -100).sum())


@pytest.mark.slow
def test_two_headed_export_reproduces_megarm_in_transformers(critique_models):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    root, models, mcores, _ = critique_models
    (megarm,) = [r for r in run_distributed(_megarm_lm, 1, {False: mcores[False]}, 1, 1)]
    joint = megarm[(False, "joint")]
    for tied in (False, True):
        out = root / f"export-{tied}"
        mcore2hf(Path(mcores[tied]), out)
        assert sorted(p.name for p in out.iterdir()) == ["causal_lm", "reward"]
        original = load_hf_tensors(models[tied])
        lm, reward = load_hf_tensors(out / "causal_lm"), load_hf_tensors(out / "reward")
        trunk = {n for n in original if n != "lm_head.weight"}
        assert set(lm) == set(original) and set(reward) == trunk | {"score.weight"}
        for name in original:  # the causal LM is the input model, bit for bit
            assert torch.equal(lm[name], original[name]), name
        for name in trunk:  # both exports share the trunk
            assert torch.equal(reward[name], lm[name]), name
        for auto in (AutoModelForCausalLM, AutoModelForSequenceClassification):
            sub = "causal_lm" if auto is AutoModelForCausalLM else "reward"
            _, info = auto.from_pretrained(str(out / sub), output_loading_info=True)
            assert not info["missing_keys"] and not info["unexpected_keys"], (sub, info)
    # The untied export reproduces megarm's joint forward: LM loss and both rewards.
    out = root / "export-False"
    pairs = _pairs()
    chosen = _tokens(pairs, ("chosen_input_ids", "chosen_labels"))
    rejected = _tokens(pairs, ("rejected_input_ids", "rejected_labels"))
    tokens, labels, valid = (torch.cat([c, r]) for c, r in zip(chosen, rejected, strict=True))
    causal = AutoModelForCausalLM.from_pretrained(str(out / "causal_lm"), dtype=torch.float32)
    scorer = AutoModelForSequenceClassification.from_pretrained(str(out / "reward"),
                                                                dtype=torch.float32)
    with torch.no_grad():
        loss = causal.eval()(input_ids=tokens, attention_mask=valid.long(), labels=labels).loss
        rewards = scorer.eval()(input_ids=tokens, attention_mask=valid.long()).logits[:, 0]
    assert math.isclose(float(loss), joint["lm_loss"], rel_tol=1e-5)
    torch.testing.assert_close(rewards, joint["rewards"], rtol=0, atol=ATOL)
