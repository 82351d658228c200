"""Critique-model training (training.objective sft / joint): the LM loss, its gradient
norm and the joint loss at every layout equal the TP=1 full-batch values on the same
weights, and the LM loss equals a cross-entropy computed by hand.

Each run takes two optimizer steps with lr 0 (the weights stay put): step 1 with the
LM loss alone (weights 0 / 1), step 2 with the joint loss (0.7 / 0.3). The weights
reach every layout through a torch_dist checkpoint the reference run saves, so the
tied output layer's copy on the last pipeline stage is loaded as megatron-core maps it.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megarm.testing import run_distributed
from tests.helpers import randomize_, tiny_config

BASE = (
    "training.global_batch_size=8",
    "training.micro_batch_size=2",
    "training.train_iters=2",
    "training.eval_interval=0",
    "data.synthetic_num_pairs=64",
    "data.seq_length=24",
    "data.split=100,0,0",
    "optimizer.lr=0.0",
    "optimizer.clip_grad=0.0",
    "logging.log_dir=null",
)
STEPS = ((0.0, 1.0), (0.7, 0.3))  # (rm_weight, lm_weight) of step 1 and step 2
KEYS = ("loss", "grad_norm", "lm_loss", "lm_tokens", "rm_loss")


def _steps(trainer) -> list[dict[str, float]]:
    """One optimizer step per entry of STEPS; the metrics of each."""
    for weights in STEPS if trainer.has_value_head else STEPS[:1]:
        trainer.loss_weights = weights
        trainer.cfg.training.train_iters = trainer.iteration + 1
        trainer.train()
    return [{k: h[k] for k in KEYS if k in h} for h in trainer.history]


def _hand_losses(trainer, cfg) -> tuple[float, float]:
    """The first global batch's LM loss (plain cross-entropy of the full logits over
    the real vocabulary at the shifted supervised labels, summed over micro-batches
    and divided by their supervised tokens) and its Bradley-Terry loss."""
    from megarm.training.data import micro_batches

    model = trainer.model[0].module
    weight = (model.embedding.word_embeddings.weight if cfg.model.tie_word_embeddings
              else model.output_layer.weight)
    captured = {}
    hook = model.decoder.register_forward_hook(lambda m, i, o: captured.update(hidden=o))
    stream = micro_batches(trainer.data.train, cfg, 0, 0, 1)
    ce_sum, count, bt = 0.0, 0, []
    with torch.no_grad():
        for _ in range(trainer.num_microbatches):
            batch = next(stream)
            lm = {} if model.value_head else {"lm_index": batch.lm_index, "lm_target": batch.lm_target}
            rewards = model(batch.tokens, batch.position_ids, None, batch.reward_index, **lm)
            logits = (captured["hidden"].double() @ weight.double().t())[..., : cfg.model.vocab_size]
            labels = batch.labels[:, 1:].t()  # [s - 1, rows]: token t is predicted at t - 1
            ce_sum += float(F.cross_entropy(logits[:-1].reshape(-1, logits.shape[-1]),
                                            labels.reshape(-1), ignore_index=-100, reduction="sum"))
            count += int((labels != -100).sum())
            if batch.num_pairs:
                chosen, rejected = rewards.double().chunk(2)
                bt.append(-F.logsigmoid(chosen - rejected - batch.margin.double()))
    hook.remove()
    return ce_sum / count, float(torch.cat(bt).mean()) if bt else float("nan")


def _reference(tie: bool, save_dir: str):
    """TP=1 PP=1: random-but-known weights (saved for the other layouts), the hand
    losses of the first global batch, and the two steps' metrics."""
    from megarm import distributed
    from megarm.checkpoint import save_checkpoint
    from megarm.model.sharding import load_state_dict_strict
    from megarm.training.loop import Trainer

    cfg = tiny_config(*BASE, "training.objective=joint", f"model.tie_word_embeddings={tie}")
    distributed.init_from_config(cfg)
    trainer = Trainer(cfg)
    module = trainer.model[0].module
    load_state_dict_strict(module, randomize_(module.state_dict()))
    trainer.optimizer.reload_model_params()
    save_checkpoint(save_dir, 1, trainer.model, {"iteration": 1, "consumed_samples": 0})
    hand = _hand_losses(trainer, cfg)
    params = {name for name, _ in module.named_parameters()}
    # The pure reward model of the same shape: still no vocabulary-sized output layer.
    from megarm.model.builder import build_model

    rm_cfg = tiny_config(*BASE, "training.objective=rm", f"model.tie_word_embeddings={tie}")
    (rm_model,) = build_model(rm_cfg)
    params_rm = {name: tuple(p.shape) for name, p in rm_model.named_parameters()}
    return _steps(trainer), hand, params, params_rm


def _layout(tie: bool, save_dir: str, overrides: tuple[str, ...], objective: str = "joint"):
    from megarm import distributed
    from megarm.training.loop import Trainer

    cfg = tiny_config(*BASE, f"training.objective={objective}", f"model.tie_word_embeddings={tie}",
                      f"checkpoint.load={save_dir}", "checkpoint.finetune=true", *overrides)
    distributed.init_from_config(cfg)
    trainer = Trainer(cfg)
    history = _steps(trainer)
    hand = _hand_losses(trainer, cfg) if objective == "sft" and cfg.parallel.pipeline_model_parallel_size == 1 \
        and cfg.parallel.tensor_model_parallel_size == 1 else None
    return history, hand


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """The (1,1) reference run per tie setting, made on first use."""
    made: dict[bool, tuple] = {}

    def get(tie: bool) -> tuple:
        if tie not in made:
            save_dir = str(tmp_path_factory.mktemp(f"critique-tied-{tie}"))
            ((result),) = run_distributed(_reference, 1, tie, save_dir)
            made[tie] = (save_dir, *result)
        return made[tie]

    return get


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_lm_and_joint_losses_are_the_hand_computed_ones(references, tie):
    _, history, (hand_lm, hand_bt), params, params_rm = references(tie)
    lm_step, joint_step = history
    assert math.isclose(lm_step["lm_loss"], hand_lm, rel_tol=1e-6)
    assert lm_step["loss"] == lm_step["lm_loss"]  # step 1: the LM loss alone
    # Step 2 (the next global batch) mixes both exactly.
    assert math.isclose(joint_step["loss"],
                        0.7 * joint_step["rm_loss"] + 0.3 * joint_step["lm_loss"], rel_tol=1e-12)
    assert joint_step["rm_loss"] > 0 and lm_step["grad_norm"] > 0
    # A tied model has no output weight of its own at one stage; an untied one has.
    assert ("output_layer.weight" in params) == (not tie)
    assert "value_head.weight" in params
    # The pure reward model allocates nothing vocabulary-sized beyond the embedding.
    assert not any(name.startswith("output_layer") for name in params_rm)
    assert params_rm["value_head.weight"] == (1, 64)
    outside = sorted(n for n in params_rm if not n.startswith("decoder."))
    assert outside == ["embedding.word_embeddings.weight", "value_head.weight"]
    del hand_bt


# Each multi-rank run checks the LM loss and grad norm (step 1) and the joint loss,
# its parts and grad norm (step 2) together; "tie" says which reference it meets.
LAYOUTS = [
    pytest.param(2, ("parallel.tensor_model_parallel_size=2",), False, id="tp2",
                 marks=pytest.mark.slow),
    pytest.param(2, ("parallel.pipeline_model_parallel_size=2",), True, id="pp2-tied",
                 marks=pytest.mark.slow),
    pytest.param(2, ("training.micro_batch_size=1",), False, id="dp2-grad-accumulation",
                 marks=pytest.mark.slow),
    pytest.param(
        2,
        ("parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true",
         "data.packing=true", "data.packed_format=thd"),
        True, id="tp2-sp-thd-tied", marks=pytest.mark.slow,
    ),
    pytest.param(
        2,
        ("parallel.pipeline_model_parallel_size=2", "data.packing=true",
         "data.packed_format=rows"),
        False, id="pp2-packed-rows", marks=pytest.mark.slow,
    ),
    pytest.param(
        4,
        ("parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"),
        True, id="tp2-pp2-tied", marks=pytest.mark.slow,
    ),
    pytest.param(
        2,
        ("parallel.use_distributed_optimizer=true", "training.micro_batch_size=1",
         "model.recompute_granularity=full", "model.recompute_method=uniform",
         "model.recompute_num_layers=2"),
        False, id="dp2-distopt-recompute", marks=pytest.mark.slow,
    ),
]


@pytest.mark.parametrize("world, overrides, tie", LAYOUTS)
def test_layout_lm_and_joint_losses_equal_tp1(references, world, overrides, tie):
    save_dir, expected, *_ = references(tie)
    for history, _ in run_distributed(_layout, world, tie, save_dir, overrides):
        for got, want in zip(history, expected, strict=True):
            for key in KEYS:
                assert key in got, key
                assert math.isclose(got[key], want[key], rel_tol=1e-6), (key, got[key], want[key])


@pytest.mark.slow
def test_sft_objective_trains_lm_only_and_matches_hand_and_pp2(references):
    """SFT records (the chosen sides, response supervised) on the same weights: no
    value head is built; the (1,1) LM loss is the hand cross-entropy; PP=2 with THD
    packing gives the same loss and grad norm."""
    tie = False
    save_dir = references(tie)[0]
    ((single, hand),) = run_distributed(_layout, 1, tie, save_dir, (), "sft")
    assert math.isclose(single[0]["lm_loss"], hand[0], rel_tol=1e-6)
    assert "rm_loss" not in single[0]
    for history, _ in run_distributed(
        _layout, 2, tie, save_dir,
        ("parallel.pipeline_model_parallel_size=2", "data.packing=true", "data.packed_format=thd"),
        "sft",
    ):
        for key in ("loss", "grad_norm", "lm_tokens"):
            assert math.isclose(history[0][key], single[0][key], rel_tol=1e-6), key


def test_shipped_critique_configs_validate():
    """The CLoud / WorldPM recipes at their stated GPUs (once they name data and
    weights), and the CPU demo's stages at 2 ranks."""
    import re
    from pathlib import Path

    from megarm.preflight import resolve

    root = Path(__file__).resolve().parents[1]
    allow = ["data.allow_synthetic=true", "checkpoint.allow_random_init=true"]
    for name, objective in [("cloud_qwen25_7b_sft", "sft"), ("cloud_qwen25_7b_joint", "joint"),
                            ("worldpm_qwen25_7b_joint", "joint")]:
        path = root / "configs" / f"{name}.yaml"
        world = int(re.search(r"^# gpus: (\d+)$", path.read_text(), re.M).group(1))
        cfg = resolve(path, allow, world)
        assert cfg.training.objective == objective and cfg.model.vocab_size == 152064
        if objective == "joint":
            assert (cfg.training.rm_loss_weight, cfg.training.lm_loss_weight) == (0.7, 0.3)
    for name in ("cloud_demo_sft", "cloud_demo_joint"):
        resolve(root / "configs" / f"{name}.yaml", [], 2)
