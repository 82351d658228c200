"""Mixture-of-experts trunks (families qwen3_moe and qwen2_moe) end to end against
transformers (fp32, CPU, gloo): tiny random Qwen3-MoE (top-2 of 4 experts,
``norm_topk_prob``) and Qwen2-MoE (top-2 of 4 without renormalisation, a gated
shared expert) ``*ForSequenceClassification`` models converted by hf2mcore give
transformers' rewards at (EP, TP, PP) = (1,1,1), and at (2,1,1), (1,2,1), (1,1,2) on
two ranks, with left and right padding; HF -> megarm -> HF is bit-identical.
Conversions and exports run in one process each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megarm.testing import run_distributed
from tests.test_convert import hf_rewards, load_hf_tensors, perturb_, token_batch
from tests.test_family_convert import convert_all

pytestmark = pytest.mark.slow

VOCAB, PAD = 512, 511
ATOL = 1e-5
EXPERTS, TOP_K = 4, 2
MODELS = {
    # name: (model_type, family-specific keys)
    "qwen3_moe": ("qwen3_moe", {"norm_topk_prob": True}),
    "qwen2_moe": ("qwen2_moe", {"norm_topk_prob": False, "shared_expert_intermediate_size": 96}),
}


def hf_config(name: str, **extra):
    from transformers import AutoConfig

    model_type, keys = MODELS[name]
    return AutoConfig.for_model(
        model_type, vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
        moe_intermediate_size=32, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-6,
        router_aux_loss_coef=0.01, pad_token_id=PAD, **keys, **extra,
    )


def make_hf(path: Path, name: str, seed: int) -> Path:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(hf_config(name, num_labels=1))
    perturb_(model, seed)
    with torch.no_grad():  # routers with clear preferences: no near-ties in the top-k
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(4.0)
    model.save_pretrained(str(path))
    return path


def batch(left: bool, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged rows of up to 24 tokens padded with PAD (left or right)."""
    return token_batch(left, seed, lengths=(24, 9, 17, 3, 24, 12), pad=PAD)


# --------------------------------------------------------------------------- rank bodies


def _full_state_dict(hf_dir: str, cfg) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """The full (TP=PP=EP=1) megarm state dict of an HF model, by the family's table."""
    from ckpt_convert.mapping import hf_to_mcore
    from megarm.families import Shape, family
    from tests.test_convert import load_hf_tensors

    hf = load_hf_tensors(Path(hf_dir))
    shape = Shape.of(cfg.model)
    entries = family(cfg.model.family).entries(
        shape.num_layers, ("value",), experts=shape.routed_experts
    )
    return dict(hf_to_mcore(hf.__getitem__, shape, entries))


def _rewards_at_layouts(models: dict[str, str], batches: list, layouts: list,
                        hf_dirs: dict[str, str] | None = None) -> dict:
    """megarm's rewards for every model at every (EP, TP, PP) of one world (the rest
    is data parallelism, every replica scoring the same rows); with ``hf_dirs``, at
    EP > 1 also from the HF weights cut for this rank by megarm's sharding of full
    state dicts (``<name>:full``)."""
    from megatron.core import parallel_state
    from megatron.core.rerun_state_machine import destroy_rerun_state_machine

    from megarm import distributed
    from megarm.checkpoint import load_model_weights
    from megarm.config import load_config
    from megarm.model.builder import build_model
    from megarm.model.masks import padding_attention_mask
    from megarm.model.sharding import load_full_state_dict
    from megarm.score import ScoreBatch, run_model
    from tests.helpers import last_valid_index

    out = {}
    for ep, tp, pp in layouts:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
            destroy_rerun_state_machine()
        distributed.init(tp, pp, expert_model_parallel_size=ep)
        for name, mcore in models.items():
            cfg = load_config(None, [
                f"model.hf_config={mcore}", "model.params_dtype=fp32",
                f"parallel.tensor_model_parallel_size={tp}",
                f"parallel.pipeline_model_parallel_size={pp}",
                f"parallel.expert_model_parallel_size={ep}",
                # megatron-core's dispatch needs it with EP and TP
                f"parallel.sequence_parallel={str(ep > 1 and tp > 1).lower()}",
            ])
            model = build_model(cfg)
            load_model_weights(mcore, model)
            sources = [(name, model)]
            if hf_dirs and ep > 1:
                cut = build_model(cfg)
                load_full_state_dict(cut, _full_state_dict(hf_dirs[name], cfg), cfg)
                sources.append((f"{name}:full", cut))
            for key, scored in sources:
                for i, (tokens, valid, left) in enumerate(batches):
                    rows = tokens.shape[0]
                    found = run_model(scored, [ScoreBatch(
                        tokens=tokens,
                        position_ids=torch.arange(tokens.shape[1]).expand_as(tokens).contiguous(),
                        reward_index=last_valid_index(valid),
                        rows=torch.arange(rows),
                        attention_mask=padding_attention_mask(valid) if left else None,
                    )])
                    if found:
                        out[(ep, tp, pp, key, i)] = torch.tensor([found[r] for r in range(rows)])
    return out


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("moe")


@pytest.fixture(scope="module")
def converted(work) -> dict[str, tuple[Path, Path]]:
    """name -> (HF *ForSequenceClassification dir, its megarm checkpoint)."""
    out = {name: (make_hf(work / f"hf-{name}", name, seed), work / f"mcore-{name}")
           for seed, name in enumerate(MODELS, start=1)}
    convert_all(list(out.values()), "hf2mcore", "--params-dtype", "fp32")
    return out


@pytest.fixture(scope="module")
def reference(converted) -> tuple[list, dict[str, list[torch.Tensor]]]:
    """The batches (right and left padding) and transformers' rewards for each."""
    batches = [(*batch(left), left) for left in (False, True)]
    expected = {name: [hf_rewards(converted[name][0], t, v) for t, v, _ in batches]
                for name in MODELS}
    return batches, expected


def _compare(per_rank: list[dict], layouts: list, batches: list, expected: dict, world: int,
             full: bool = False) -> dict:
    worst: dict[str, float] = {}
    for ep, tp, pp in layouts:
        for model in MODELS:
            for name in [model, f"{model}:full"] if full and ep > 1 else [model]:
                _compare_one(per_rank, (ep, tp, pp), name, batches, expected[model], world, worst)
    return worst


def _compare_one(per_rank: list[dict], layout: tuple, name: str, batches: list,
                 expected: list[torch.Tensor], world: int, worst: dict[str, float]) -> None:
    ep, tp, pp = layout
    for i, want in enumerate(expected):
        got = [r[(ep, tp, pp, name, i)] for r in per_rank if (ep, tp, pp, name, i) in r]
        assert len(got) == world // (tp * pp), (layout, name)
        assert want.abs().max() > 0.1, "rewards too small to compare meaningfully"
        delta = max(float((g - want).abs().max()) for g in got)
        key = f"{name} EP{ep} TP{tp} PP{pp}"
        worst[key] = max(worst.get(key, 0.0), delta)
        assert delta <= ATOL, (layout, name, "left" if batches[i][2] else "right", delta)


# --------------------------------------------------------------------------- tests


def test_rewards_equal_transformers_in_one_process(converted, reference):
    batches, expected = reference
    layouts = [(1, 1, 1)]
    models = {name: str(converted[name][1]) for name in MODELS}
    per_rank = run_distributed(_rewards_at_layouts, 1, models, batches, layouts, timeout=600)
    worst = _compare(per_rank, layouts, batches, expected, 1)
    print("max |reward - transformers'|:", json.dumps(worst))


def test_rewards_equal_transformers_with_expert_tensor_and_pipeline_parallelism(converted, reference):
    batches, expected = reference
    layouts = [(2, 1, 1), (1, 2, 1), (1, 1, 2)]
    models = {name: str(converted[name][1]) for name in MODELS}
    hf_dirs = {name: str(converted[name][0]) for name in MODELS}
    per_rank = run_distributed(_rewards_at_layouts, 2, models, batches, layouts, hf_dirs, timeout=900)
    worst = _compare(per_rank, layouts, batches, expected, 2, full=True)
    print("max |reward - transformers'|:", json.dumps(worst))


def test_the_comparison_has_teeth(converted, reference):
    """transformers itself: Qwen3-MoE without renormalised top-k probabilities, or
    with top-1 routing, gives rewards far beyond the tolerance, so the equality above
    tests the routing."""
    from transformers import AutoModelForSequenceClassification

    batches, expected = reference
    tokens, valid, _ = batches[0]
    for change in ({"norm_topk_prob": False}, {"num_experts_per_tok": 1}):
        model = AutoModelForSequenceClassification.from_pretrained(
            str(converted["qwen3_moe"][0]), dtype=torch.float32, **change
        )
        assert (hf_rewards(model, tokens, valid) - expected["qwen3_moe"][0]).abs().max() > 1e-3, change


def test_hf_megarm_hf_is_bit_identical(converted, reference, work):
    from transformers import AutoModelForSequenceClassification

    batches, expected = reference
    pairs = {name: (converted[name][1], work / f"back-{name}") for name in MODELS}
    convert_all(list(pairs.values()), "mcore2hf")
    for name, (_, back) in pairs.items():
        hf, _ = converted[name]
        original, exported = load_hf_tensors(hf), load_hf_tensors(back)
        assert sum("experts." in key for key in original) == 2 * EXPERTS * 3  # gate, up, down
        assert set(exported) == set(original), name
        for key in original:
            assert torch.equal(original[key], exported[key]), (name, key)
        config = json.loads((back / "config.json").read_text())
        source = json.loads((hf / "config.json").read_text())
        for key, value in source.items():
            if key == "sliding_window":  # the export writes "no window" as 4.x reads it
                assert config[key] in (None, value), (name, key, config[key])
            elif key not in ("problem_type", "transformers_version"):
                assert config[key] == value, (name, key)
        model, loading = AutoModelForSequenceClassification.from_pretrained(
            str(back), output_loading_info=True
        )
        assert not any(loading.values()), (name, loading)
        for (tokens, valid, _), want in zip(batches, expected[name]):
            assert torch.equal(hf_rewards(model, tokens, valid), want), name


# --------------------------------------------------------------------------- training


def _train_at_ep(mcore: str, save_root: str, layouts: list, tokens: torch.Tensor,
                 valid: torch.Tensor) -> dict:
    """Train from the converted weights at each (EP, distributed optimizer) of one
    2-rank world; each run's per-iteration losses and its rewards after training."""
    from megatron.core import parallel_state
    from megatron.core.rerun_state_machine import destroy_rerun_state_machine

    from megarm import distributed
    from megarm.checkpoint import load_model_weights
    from megarm.config import load_config
    from megarm.model.builder import build_model
    from megarm.score import ScoreBatch, run_model
    from megarm.training.loop import Trainer
    from tests.helpers import last_valid_index

    out = {}
    for ep, dist_opt in layouts:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
            destroy_rerun_state_machine()
        distributed.init(1, 1, expert_model_parallel_size=ep)
        cfg = load_config(None, [
            f"model.hf_config={mcore}", "model.params_dtype=fp32",
            f"parallel.expert_model_parallel_size={ep}",
            f"parallel.use_distributed_optimizer={str(dist_opt).lower()}",
            f"checkpoint.load={mcore}", f"checkpoint.save={save_root}/ep{ep}-{dist_opt}",
            "training.train_iters=10", "training.micro_batch_size=2", "training.global_batch_size=8",
            "optimizer.lr=1e-2", "optimizer.lr_warmup_fraction=0", "data.synthetic_num_pairs=32",
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
        out[(ep, dist_opt)] = {
            "loss": [h["loss"] for h in trainer.history],
            "aux": [h["moe_aux_loss"] for h in trainer.history],
            "balance": [h["moe_load_balance"] for h in trainer.history],
            "rewards": torch.tensor([found[r] for r in range(tokens.shape[0])]) if found else None,
        }
        trainer.close()
    # The EP=2 checkpoint's weights at EP=1 (megatron-core's checkpoint numbers the
    # experts globally).
    parallel_state.destroy_model_parallel()
    destroy_rerun_state_machine()
    distributed.init(1, 1)
    cfg = load_config(None, [f"model.hf_config={mcore}", "model.params_dtype=fp32"])
    model = build_model(cfg)
    load_model_weights(f"{save_root}/ep2-False", model)
    found = run_model(model, [ScoreBatch(
        tokens=tokens,
        position_ids=torch.arange(tokens.shape[1]).expand_as(tokens).contiguous(),
        reward_index=last_valid_index(valid),
        rows=torch.arange(tokens.shape[0]),
    )])
    out["ep2 checkpoint at ep1"] = torch.tensor([found[r] for r in range(tokens.shape[0])])
    return out


def test_training_at_ep2_equals_ep1(converted, work):
    """The same weights and data trained at EP=1 (experts replicated, gradients
    all-reduced over DP=2) and EP=2 (two experts per rank, tokens moved by all-to-all),
    with and without the distributed optimizer: the same losses and rewards."""
    tokens, valid = batch(left=False, seed=11)
    layouts = [(1, False), (2, False), (2, True)]
    per_rank = run_distributed(_train_at_ep, 2, str(converted["qwen3_moe"][1]), str(work / "train"),
                               layouts, tokens, valid, timeout=900)
    runs = per_rank[0]
    base = runs[(1, False)]
    assert len(base["loss"]) == 10 and base["loss"][0] != base["loss"][-1], base["loss"]
    before = hf_rewards(converted["qwen3_moe"][0], tokens, valid)
    assert (before - base["rewards"]).abs().max() > 1e-3, "training moved no weight"
    for layout in layouts[1:]:
        run = runs[layout]
        first = abs(run["loss"][0] - base["loss"][0]) / abs(base["loss"][0])
        # Relative to the loss scale (step 1): by step 10 the 32 pairs are fitted and the
        # loss is ~1e-7, where a per-step relative difference says nothing.
        worst = max(abs(a - b) for a, b in zip(run["loss"], base["loss"], strict=True)) / abs(base["loss"][0])
        # Rewards after 10 Adam steps at lr 1e-2, relative to their scale: Adam's first
        # steps move every weight by ~lr whatever the gradient's size, so summation-order
        # differences of 1e-7 in tiny gradients show up in the weights.
        reward = float((run["rewards"] - base["rewards"]).abs().max() / base["rewards"].abs().max())
        print(f"EP={layout[0]} distributed optimizer={layout[1]}: step-1 loss rel {first:.1e}, "
              f"10 steps rel {worst:.1e}, rewards rel {reward:.1e} (scale "
              f"{float(base['rewards'].abs().max()):.2f})")
        assert first <= 1e-6 and worst <= 1e-5 and reward <= 1e-5, (layout, first, worst, reward)
        # The auxiliary loss the routers added, logged per step: the same at both EPs.
        aux = max(abs(a - b) / b for a, b in zip(run["aux"], base["aux"], strict=True))
        assert aux <= 1e-5, (layout, run["aux"], base["aux"])
    # coefficient 0.01 (router_aux_loss_coef) x 2 layers x a load balance >= 1
    assert all(b >= 1.0 for b in base["balance"]), base["balance"]
    assert base["aux"][0] == pytest.approx(0.01 * 2 * base["balance"][0], rel=1e-6)
    print("moe_aux_loss per step at EP=1:", base["aux"], "load balance:", base["balance"])
    resumed = float((per_rank[0]["ep2 checkpoint at ep1"] - runs[(2, False)]["rewards"]).abs().max())
    print(f"EP=2 checkpoint scored at EP=1: max |reward difference| {resumed:.1e}")
    assert resumed <= 1e-5 * float(base["rewards"].abs().max())


# --------------------------------------------------------------------------- auxiliary loss


def _aux_losses(mcore: str, tokens: torch.Tensor) -> dict[str, list[float]]:
    """megatron-core's load-balancing loss and z-loss of each layer (divided by their
    coefficients, as its tracker keeps them) for one training-mode forward, and the
    step's metrics as the loop logs them."""
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
    )

    from megarm import distributed
    from megarm.checkpoint import load_model_weights
    from megarm.config import load_config
    from megarm.model.builder import build_model
    from megarm.model.moe import aux_loss_metrics

    distributed.init(1, 1)
    cfg = load_config(None, [f"model.hf_config={mcore}", "model.params_dtype=fp32",
                             f"model.moe_z_loss_coeff={Z_COEFF}"])
    (model,) = build_model(cfg)
    load_model_weights(mcore, [model])
    model.train()
    clear_aux_losses_tracker()
    positions = torch.arange(tokens.shape[1]).expand_as(tokens).contiguous()
    model(tokens, positions, None, reward_index=torch.full((tokens.shape[0],), tokens.shape[1] - 1))
    tracker = get_moe_layer_wise_logging_tracker()
    out = {name: [float(v) for v in tracker[name]["values"]] for name in ("load_balancing_loss", "z_loss")}
    out["metrics"] = aux_loss_metrics(1, cfg.model)
    return out


Z_COEFF = 1e-3


def test_aux_loss_equals_transformers_load_balancing_loss(converted):
    """Layer by layer, megatron-core's load-balancing loss is transformers'
    ``load_balancing_loss_func`` on that layer's router logits divided by top-k
    (megatron-core counts each token's share of the top-k assignments, transformers
    each assignment), for rows without padding (megatron-core counts every token it
    routes; transformers leaves out the masked ones)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, PAD, (3, 20), generator=gen)
    for name in MODELS:
        hf, mcore = converted[name]
        (found,) = run_distributed(_aux_losses, 1, str(mcore), tokens, timeout=600)
        ours = found["load_balancing_loss"]
        model = AutoModelForSequenceClassification.from_pretrained(str(hf), dtype=torch.float32)
        with torch.no_grad():
            logits = model.model(input_ids=tokens, output_router_logits=True).router_logits
        assert len(logits) == len(ours) == 2
        z_by_hand = []
        for layer, (mine, theirs) in enumerate(zip(ours, logits, strict=True)):
            want = float(load_balancing_loss_func((theirs,), EXPERTS, TOP_K)) / TOP_K
            print(f"{name} layer {layer}: megatron-core {mine:.8f}, transformers / top-k {want:.8f}")
            assert abs(mine - want) <= 1e-6, (name, layer, mine, want)
            # ST-MoE's z-loss by hand on transformers' router logits: mean over tokens
            # of logsumexp(logits)^2.
            z_by_hand.append(float(torch.logsumexp(theirs.double(), dim=-1).square().mean()))
            z = found["z_loss"][layer]
            assert z == pytest.approx(z_by_hand[-1], rel=1e-6), (name, layer, z, z_by_hand[-1])
        # A balanced router gives 1; these are measurably unbalanced (the test has teeth).
        assert max(ours) > 1.01
        assert min(z_by_hand) > 0.1  # logits far enough from 0 for the z-loss to show
        metrics = found["metrics"]
        assert metrics["moe_z_loss"] == pytest.approx(Z_COEFF * sum(z_by_hand), rel=1e-6)
        assert metrics["moe_aux_loss"] == pytest.approx(0.01 * sum(ours), rel=1e-6)  # router_aux_loss_coef


# --------------------------------------------------------------------------- memory


def _parameter_counts(hf_dirs: dict[str, str], layouts: list) -> dict:
    """(parameters this rank's model holds, the estimator's count) per layout."""
    from megatron.core import parallel_state
    from megatron.core.rerun_state_machine import destroy_rerun_state_machine

    from megarm import distributed
    from megarm.config import load_config
    from megarm.model.builder import build_model, count_parameters
    from megarm.training.memory import stage_parameters

    out = {}
    for ep, tp in layouts:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
            destroy_rerun_state_machine()
        distributed.init(tp, 1, expert_model_parallel_size=ep)
        for name, hf in hf_dirs.items():
            cfg = load_config(None, [
                f"model.hf_config={hf}", "model.params_dtype=fp32",
                f"parallel.expert_model_parallel_size={ep}", f"parallel.tensor_model_parallel_size={tp}",
                f"parallel.sequence_parallel={str(tp > 1).lower()}",
            ])
            out[(ep, tp, name)] = (count_parameters(build_model(cfg, device="meta")), stage_parameters(cfg, 0))
    return out


def test_the_memory_estimate_counts_each_ranks_experts(converted):
    """The estimator's parameters per rank equal the built model's at EP=1, EP=2 and
    TP=2 (experts split by EP, then by TP; router replicated; shared expert split
    by TP)."""
    hf_dirs = {name: str(converted[name][0]) for name in MODELS}
    (one,) = run_distributed(_parameter_counts, 1, hf_dirs, [(1, 1)], timeout=600)
    per_rank = run_distributed(_parameter_counts, 2, hf_dirs, [(2, 1), (1, 2)], timeout=600)
    for counts in [one, *per_rank]:
        for key, (built, estimated) in counts.items():
            assert built == estimated, (key, built, estimated)
    assert per_rank[0][(2, 1, "qwen3_moe")][0] < one[(1, 1, "qwen3_moe")][0]
