"""Every shipped config validates at its intended world size, once it names its data
and starting weights (the launchers: tests/test_launchers.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from megarm.config import ConfigError
from megarm.families.base import padded_vocab_size
from megarm.preflight import resolve

ROOT = Path(__file__).resolve().parents[1]
QWEN = sorted(ROOT.glob("configs/orm_trainer_qwen25_*.yaml"))

# Qwen2.5 shapes from the published config.json files:
# (layers, hidden, intermediate, heads, kv heads, vocab).
REAL = {
    "0.5b": (24, 896, 4864, 14, 2, 151936),
    "1.5b": (28, 1536, 8960, 12, 2, 151936),
    "3b": (36, 2048, 11008, 16, 2, 151936),
    "7b": (28, 3584, 18944, 28, 4, 152064),
    "14b": (48, 5120, 13824, 40, 8, 152064),
    "32b": (64, 5120, 27648, 40, 8, 152064),
    "72b": (80, 8192, 29568, 64, 8, 152064),
}


def intended_world_size(path: Path) -> int:
    match = re.search(r"^# gpus: (\d+)$", path.read_text(), re.M)
    assert match, f"{path.name} must state its GPUs as '# gpus: N'"
    return int(match.group(1))


def resolve_as_shipped(path: Path):
    """The config at its intended world size: as shipped it names no data and no
    weights (validation says exactly that); with both stood in for, it resolves."""
    world = intended_world_size(path)
    with pytest.raises(ConfigError) as exc:
        resolve(path, [], world)
    assert sorted(i.key for i in exc.value.issues) == ["checkpoint.load", "data.data_path"]
    return resolve(path, ["data.allow_synthetic=true", "checkpoint.allow_random_init=true"], world), world


def test_all_sizes_are_shipped():
    assert sorted(p.stem.rsplit("_", 1)[1] for p in QWEN) == sorted(REAL)


@pytest.mark.parametrize("path", QWEN, ids=lambda p: p.stem)
def test_qwen_config_validates_with_real_shapes(path):
    cfg, _ = resolve_as_shipped(path)
    m = cfg.model
    size = path.stem.rsplit("_", 1)[1]
    got = (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads,
           m.num_query_groups, m.vocab_size)
    assert got == REAL[size]
    assert padded_vocab_size(m) == m.vocab_size  # Qwen's vocab needs no padding
    assert m.rotary_base == 1e6 and m.norm_epsilon == 1e-6 and m.add_qkv_bias


def test_tiny_config_validates():
    resolve(ROOT / "configs/orm_trainer_tiny.yaml", [], 2)


LONG = sorted(ROOT.glob("configs/long_*.yaml"))


def test_long_input_configs_are_shipped():
    assert [p.stem for p in LONG] == ["long_llama31_70b_128k", "long_qwen25_32b_32k", "long_qwen25_7b_32k"]


@pytest.mark.parametrize("path", LONG, ids=lambda p: p.stem)
def test_long_input_config_validates_and_fits_80gb(path):
    """The context-parallel configs validate at their GPUs and their stated memory
    estimate is the estimator's, under 80 GiB."""
    from megarm.training.memory import GIB, estimate

    world = intended_world_size(path)
    cfg = resolve(path, ["data.allow_synthetic=true", "checkpoint.allow_random_init=true"], world)
    p = cfg.parallel
    assert p.context_parallel_size > 1 and cfg.data.packing
    length = int(path.stem.rsplit("_", 1)[1][:-1]) * 1024
    assert cfg.data.seq_length == length <= cfg.model.max_position_embeddings
    peak = estimate(cfg, world).training_peak / GIB
    assert peak < 80
    assert f"{peak:.2f} GiB at the training peak" in path.read_text()


@pytest.mark.parametrize("name, objective", [
    ("listwise_qwen25_7b_ultrafeedback", "listwise"),
    ("regression_qwen25_7b_helpsteer2", "regression"),
])
def test_objective_recipes_validate_at_their_world_size(name, objective):
    path = ROOT / f"configs/{name}.yaml"
    cfg, world = resolve_as_shipped(path)
    assert cfg.training.objective == objective
    if objective == "regression":
        assert cfg.model.num_labels == 5 and cfg.model.label_names.split(",")[0] == "helpfulness"


@pytest.mark.parametrize("name, handler", [
    ("ultrafeedback_ranked", "ultrafeedback_ranked"), ("helpsteer2_regression", "helpsteer2"),
])
def test_objective_dataset_configs_parse(name, handler):
    from megarm.data.preprocess import parse_args

    args = parse_args(["--config", str(ROOT / f"configs/datasets/{name}.yaml")])
    assert args.handler_name == handler
    if handler == "helpsteer2":
        assert args.label_names[0] == "helpfulness" and list(args.label_range) == [0, 4]


# Qwen3-MoE shapes from the published config.json files: (layers, hidden, heads, kv
# heads, experts, top-k, expert FFN).
MOE = {
    "orm_trainer_qwen3_30b_a3b": (48, 2048, 32, 4, 128, 8, 768),
    "orm_trainer_qwen3_235b_a22b": (94, 4096, 64, 4, 128, 8, 1536),
}


@pytest.mark.parametrize("name", sorted(MOE))
def test_moe_configs_validate_and_fit_80gb(name):
    """The mixture-of-experts configs validate at their GPUs with the real shapes, and
    their stated training peak is the estimator's, under 80 GiB."""
    from megarm.training.memory import GIB, estimate, stage_expert_parameters

    path = ROOT / f"configs/{name}.yaml"
    cfg, world = resolve_as_shipped(path)
    m, p = cfg.model, cfg.parallel
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups, m.num_moe_experts,
            m.moe_router_topk, m.moe_ffn_hidden_size) == MOE[name]
    assert m.family == "qwen3_moe" and m.moe_norm_topk_prob and p.expert_model_parallel_size > 1
    est = estimate(cfg, world)
    # The routed experts are most of each rank's parameters, as in the real model.
    assert stage_expert_parameters(cfg, 0) > 0.6 * est.parameters
    peak = est.training_peak / GIB
    assert peak < 80
    assert f"{peak:.2f} GiB at the" in path.read_text()
