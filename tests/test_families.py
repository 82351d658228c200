"""Model families as data (megarm/families): published config.json files read into the
shipped configs, the config table in both directions against transformers' own
config classes, the weight tables against transformers' models, refusals by name
before any weight is read, Llama 3's RoPE frequencies against transformers, and the
structure rules (the tables are the only place HF keys and weight names are spelled;
what imports what). The numeric checks of converted models are in
tests/test_family_convert.py."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megarm.config import ConfigError, load_config
from megarm.families import FAMILIES, detect, head_weight, megatron_rule
from megarm.preflight import resolve
from megarm.testing import run_distributed

ROOT = Path(__file__).resolve().parents[1]
START = ["data.allow_synthetic=true", "checkpoint.allow_random_init=true"]

# The keys megarm reads of published config.json files (transformers 4 layout).
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False,
    "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 12288,
    "max_position_embeddings": 40960, "max_window_layers": 36, "num_attention_heads": 32,
    "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
    "tie_word_embeddings": False, "use_sliding_window": False, "vocab_size": 151936,
}
QWEN3_06B = {**QWEN3_8B, "hidden_size": 1024, "intermediate_size": 3072,
             "num_hidden_layers": 28, "num_attention_heads": 16, "tie_word_embeddings": True}
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
    "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336,
    "max_position_embeddings": 131072, "mlp_bias": False, "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "vocab_size": 128256,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}
LLAMA32_1B = {**LLAMA31_8B, "head_dim": 64, "hidden_size": 2048, "intermediate_size": 8192,
              "num_hidden_layers": 16, "tie_word_embeddings": True,
              "rope_scaling": {**LLAMA31_8B["rope_scaling"], "factor": 32.0}}

QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "attention_bias": False,
    "decoder_sparse_step": 1, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048,
    "intermediate_size": 6144, "max_position_embeddings": 40960, "max_window_layers": 48,
    "mlp_only_layers": [], "moe_intermediate_size": 768, "norm_topk_prob": True,
    "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001, "sliding_window": None, "tie_word_embeddings": False,
    "use_sliding_window": False, "vocab_size": 151936,
}
QWEN15_MOE_A27B = {
    "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "decoder_sparse_step": 1,
    "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 5632,
    "max_position_embeddings": 8192, "max_window_layers": 21, "moe_intermediate_size": 1408,
    "norm_topk_prob": False, "num_attention_heads": 16, "num_experts": 60,
    "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_key_value_heads": 16,
    "output_router_logits": False, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001, "shared_expert_intermediate_size": 5632,
    "sliding_window": 32768, "tie_word_embeddings": False, "use_sliding_window": False,
    "vocab_size": 151936,
}


def write_config(path: Path, config: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "name, published",
    [("qwen3_8b", QWEN3_8B), ("qwen3_0.6b", QWEN3_06B), ("llama31_8b", LLAMA31_8B),
     ("llama32_1b", LLAMA32_1B)],
)
def test_published_config_agrees_with_the_shipped_yaml(tmp_path, name, published):
    """Every shape and numeric key of the shipped YAML equals the published model's
    (a disagreeing key would be named), and the family's fixed fields follow."""
    path = ROOT / "configs" / f"orm_trainer_{name}.yaml"
    gpus = int(re.search(r"^# gpus: (\d+)$", path.read_text(), re.M).group(1))
    hf = write_config(tmp_path / "hf", published)
    cfg = resolve(path, [f"model.hf_config={hf}", *START], gpus)
    m = cfg.model
    assert m.family == published["model_type"]
    assert m.qk_layernorm == (m.family == "qwen3") and not m.add_qkv_bias
    assert m.use_rope_scaling == (m.family == "llama")
    # The same config.json through transformers 5's layout (rope_parameters only).
    rope = published.get("rope_scaling") or {"rope_type": "default"}
    v5 = {k: v for k, v in published.items() if k not in ("rope_scaling", "rope_theta")}
    v5["rope_parameters"] = {**rope, "rope_theta": published["rope_theta"]}
    again = resolve(path, [f"model.hf_config={write_config(tmp_path / 'v5', v5)}", *START], gpus)
    again.model.hf_config = cfg.model.hf_config
    assert again == cfg


@pytest.mark.parametrize("published", [QWEN3_30B_A3B, QWEN15_MOE_A27B], ids=["qwen3-30b-a3b", "qwen1.5-moe-a2.7b"])
def test_published_moe_configs_read_into_megarm_and_back(tmp_path, published):
    """The expert keys of published Qwen3-MoE and Qwen2-MoE configs, both ways: read
    into ModelConfig, written back by the table, equal to the published values."""
    hf = write_config(tmp_path / "hf", published)
    m = load_config(None, [f"model.hf_config={hf}"]).model
    shared = published.get("shared_expert_intermediate_size")
    assert (m.family, m.num_moe_experts, m.moe_router_topk, m.moe_ffn_hidden_size,
            m.moe_shared_expert_intermediate_size, m.moe_norm_topk_prob, m.moe_aux_loss_coeff) == (
        published["model_type"], published["num_experts"], published["num_experts_per_tok"],
        published["moe_intermediate_size"], shared, published["norm_topk_prob"], 0.001)
    assert (m.qk_layernorm, m.add_qkv_bias) == ((True, False) if shared is None else (False, True))
    written = FAMILIES[m.family].write(m)
    for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                "router_aux_loss_coef", "intermediate_size", "num_hidden_layers"):
        assert written[key] == published[key], key
    assert ("shared_expert_intermediate_size" in written) == (shared is not None)
    # A dense family refuses experts, a mixture-of-experts one needs them.
    with pytest.raises(ConfigError) as exc:
        resolve(None, ["model.family=qwen3", "model.num_moe_experts=8"])
    assert [i.key for i in exc.value.issues] == ["model.num_moe_experts"]
    with pytest.raises(ConfigError) as exc:
        resolve(None, ["model.family=qwen3_moe"])
    assert "model.num_moe_experts" in [i.key for i in exc.value.issues]
    with pytest.raises(ConfigError) as exc:
        resolve(None, ["model.family=qwen3_moe", "model.num_moe_experts=8", "model.moe_ffn_hidden_size=32",
                       "model.moe_shared_expert_intermediate_size=64", "model.moe_router_topk=9"])
    assert sorted(i.key for i in exc.value.issues) == [
        "model.moe_router_topk", "model.moe_shared_expert_intermediate_size"]


def test_expert_parallelism_is_validated():
    moe = ["model.family=qwen3_moe", "model.num_moe_experts=6", "model.moe_ffn_hidden_size=32"]
    assert resolve(None, [*moe, "parallel.expert_model_parallel_size=2"], 2).parallel.expert_model_parallel_size == 2
    cases = {
        "parallel.expert_model_parallel_size=4": ("must divide the 6 experts; allowed: 1, 2, 3, 6", 4),
        "parallel.expert_model_parallel_size=3": ("world size 4 is not divisible by TP x EP x PP = 1 x 3 x 1", 4),
        "parallel.expert_model_parallel_size=0": ("must be >= 1", 4),
    }
    for override, (message, world) in cases.items():
        with pytest.raises(ConfigError) as exc:
            resolve(None, [*moe, override], world)
        found = {i.key: i.message for i in exc.value.issues}
        assert message in found["parallel.expert_model_parallel_size"], (override, found)
    with pytest.raises(ConfigError) as exc:
        resolve(None, ["parallel.expert_model_parallel_size=2"], 2)
    assert "needs a mixture-of-experts trunk" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        resolve(None, [*moe, "parallel.expert_model_parallel_size=2", "parallel.tensor_model_parallel_size=2"], 4)
    assert [i.key for i in exc.value.issues] == ["parallel.sequence_parallel"]


def test_a_family_sets_its_fixed_fields_and_refuses_others():
    m = load_config(None, ["model.family=qwen3"]).model
    assert m.qk_layernorm and not m.add_qkv_bias
    m = load_config(None, ["model.family=llama"]).model
    assert not m.qk_layernorm and not m.add_qkv_bias
    assert load_config(None).model.add_qkv_bias  # qwen2, the default
    with pytest.raises(ConfigError) as exc:
        resolve(None, ["model.family=qwen3", "model.add_qkv_bias=true", "model.use_rope_scaling=true"])
    found = {i.key: i.message for i in exc.value.issues}
    assert sorted(found) == ["model.add_qkv_bias", "model.use_rope_scaling"]
    assert "qwen3" in found["model.use_rope_scaling"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_config_table_writes_what_transformers_and_megarm_read_back(tmp_path, family):
    """megarm -> HF through the table, saved by transformers' own config class, read
    back by transformers and by megarm: the same model both ways."""
    from transformers import AutoConfig

    overrides = [
        f"model.family={family}", "model.num_layers=3", "model.hidden_size=96",
        "model.ffn_hidden_size=160", "model.num_attention_heads=6", "model.num_query_groups=2",
        "model.kv_channels=24", "model.vocab_size=1000", "model.max_position_embeddings=512",
        "model.rotary_base=250000.0", "model.norm_epsilon=1e-5", "model.tie_word_embeddings=true",
    ]
    if family == "llama":
        overrides += ["model.use_rope_scaling=true", "model.rope_scaling_factor=16.0",
                      "model.rope_low_freq_factor=2.0", "model.rope_high_freq_factor=8.0",
                      "model.rope_original_max_positions=64"]
    if FAMILIES[family].moe:
        overrides += ["model.num_moe_experts=6", "model.moe_router_topk=3", "model.moe_ffn_hidden_size=40",
                      "model.moe_norm_topk_prob=true", "model.moe_aux_loss_coeff=0.01"]
        if family == "qwen2_moe":
            overrides += ["model.moe_shared_expert_intermediate_size=72"]
    model = load_config(None, overrides).model
    keys = FAMILIES[family].write(model)
    config = AutoConfig.for_model(keys.pop("model_type"), **keys)
    config.save_pretrained(str(tmp_path / "hf"))
    theirs = AutoConfig.from_pretrained(str(tmp_path / "hf"))
    assert (theirs.num_hidden_layers, theirs.intermediate_size, theirs.num_key_value_heads,
            theirs.head_dim, theirs.rms_norm_eps, theirs.tie_word_embeddings) == (3, 160, 2, 24, 1e-5, True)
    assert theirs.rope_parameters["rope_theta"] == 250000.0
    if FAMILIES[family].moe:
        assert (theirs.num_experts, theirs.num_experts_per_tok, theirs.moe_intermediate_size,
                theirs.norm_topk_prob, theirs.router_aux_loss_coef) == (6, 3, 40, True, 0.01)
        assert getattr(theirs, "shared_expert_intermediate_size", None) == (72 if family == "qwen2_moe" else None)
    if family == "llama":
        assert theirs.rope_parameters["rope_type"] == "llama3"
        assert theirs.rope_parameters["original_max_position_embeddings"] == 64
    back = load_config(None, [f"model.hf_config={tmp_path / 'hf'}"]).model
    back.hf_config = None
    assert back == model


# --------------------------------------------------------------------------- refusals


def _refusal_cases() -> dict[str, tuple[dict, str]]:
    qwen3 = {**QWEN3_8B, "num_hidden_layers": 4}
    llama = {**LLAMA31_8B, "num_hidden_layers": 4}
    return {
        # Mixture-of-experts trunks are families (qwen3_moe, qwen2_moe); what is still not:
        "mla-type": ({**qwen3, "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"]},
                     "'deepseek_v3' is not supported: multi-head latent attention (MLA)"),
        "mla-key": ({**QWEN3_30B_A3B, "num_hidden_layers": 4, "kv_lora_rank": 512},
                    "kv_lora_rank=512: multi-head latent attention (MLA)"),
        "deepseek-experts": ({**QWEN3_30B_A3B, "num_hidden_layers": 4, "n_routed_experts": 256},
                             "n_routed_experts=256: DeepSeek-style experts"),
        "dense-among-sparse": ({**QWEN3_30B_A3B, "num_hidden_layers": 4, "decoder_sparse_step": 2},
                               "decoder_sparse_step=2: dense MLP layers among the expert layers"),
        "mlp-only-layers": ({**QWEN15_MOE_A27B, "num_hidden_layers": 4, "mlp_only_layers": [0]},
                            "mlp_only_layers=[0]: dense MLP layers among the expert layers"),
        "moe-key-on-dense": ({**qwen3, "num_experts": 128},
                             "num_experts=128: a mixture-of-experts model in a dense family"),
        "sliding-window": ({**qwen3, "use_sliding_window": True}, "use_sliding_window is true"),
        "sliding-layers": ({**qwen3, "layer_types": ["full_attention", "sliding_attention"] * 2},
                           "layer_types has sliding-window layers"),
        "yarn": ({**llama, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE type 'yarn'"),
        "dynamic": ({**llama, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "RoPE type 'dynamic'"),
        "longrope-v5": ({**{k: v for k, v in llama.items() if k != "rope_scaling"},
                         "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}},
                        "RoPE type 'longrope'"),
        "llama3-rope-on-qwen3": ({**qwen3, "rope_scaling": LLAMA31_8B["rope_scaling"]},
                                 "RoPE type 'llama3' is not supported by megarm's qwen3"),
        "architecture": ({**llama, "architectures": ["MambaForCausalLM"]},
                         "architecture 'MambaForCausalLM' is not supported"),
        "model-type": ({**llama, "model_type": "gemma2"}, "model_type 'gemma2' is not supported"),
        "mismatch": ({**llama, "architectures": ["Qwen3ForCausalLM"]},
                     "'Qwen3ForCausalLM' is a qwen3 model but model_type is 'llama'"),
        "attention-bias": ({**llama, "attention_bias": True}, "attention_bias=True"),
        "mlp-bias": ({**llama, "mlp_bias": True}, "mlp_bias=True"),
        "activation": ({**qwen3, "hidden_act": "gelu"}, "hidden_act='gelu'"),
    }


def test_unsupported_models_are_refused_by_name_before_any_weight_is_read(tmp_path, capsys, monkeypatch):
    import safetensors

    from ckpt_convert import hf2mcore

    def forbidden(*args, **kwargs):
        raise AssertionError("a weight file was opened")

    monkeypatch.setattr(safetensors, "safe_open", forbidden)
    monkeypatch.setattr(hf2mcore, "safe_open", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    for name, (config, message) in _refusal_cases().items():
        hf = write_config(tmp_path / name, config)
        (hf / "model.safetensors").write_bytes(b"\xff" * 64)  # unreadable: never read
        code = hf2mcore.main(["--load-dir", str(hf), "--save-dir", str(tmp_path / f"{name}-out")])
        err = capsys.readouterr().err
        assert code == 2 and message in err, (name, err)
        assert not (tmp_path / f"{name}-out").exists()
        # The config validator refuses it the same way, naming model.hf_config.
        with pytest.raises(ConfigError) as exc:
            load_config(None, [f"model.hf_config={hf}"])
        assert [i.key for i in exc.value.issues] == ["model.hf_config"], name
        assert message in exc.value.issues[0].message, name


# --------------------------------------------------------------------------- weights


def _tiny_hf_config(family: str):
    from transformers import AutoConfig

    extra = {"rope_scaling": LLAMA31_8B["rope_scaling"]} if family == "llama" else {}
    if FAMILIES[family].moe:
        extra.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24)
        if family == "qwen2_moe":
            extra.update(shared_expert_intermediate_size=40)
    return AutoConfig.for_model(
        FAMILIES[family].model_type, vocab_size=300, hidden_size=32, intermediate_size=48,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_labels=1, tie_word_embeddings=False, pad_token_id=0, **extra,
    )


def _saved_shapes(model, path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape as transformers writes the model to disk (transformers 5
    fuses a mixture-of-experts layer's experts in memory, not in the files)."""
    from safetensors import safe_open

    if not any(p.is_meta for p in model.parameters()):
        model.save_pretrained(str(path))
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_weight_table_names_every_tensor_of_transformers_models(family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from megarm.families import Shape

    fam = FAMILIES[family]
    config = _tiny_hf_config(family)
    moe = (4, 24, 40 if family == "qwen2_moe" else 0) if fam.moe else ()
    shape = Shape(2, 32, 48, 4, 2, 16, 300, 384, *moe)
    # Dense models on the meta device; tiny MoE ones for real, to be saved.
    with torch.device("cpu" if fam.moe else "meta"):
        scored = AutoModelForSequenceClassification.from_config(config)
        causal = AutoModelForCausalLM.from_config(config)
    assert type(scored).__name__ == fam.sequence_classification
    assert type(causal).__name__ == fam.causal_lm
    assert _saved_shapes(scored, tmp_path / "scored") == fam.hf_shapes(shape, ("value",))
    saved = _saved_shapes(causal, tmp_path / "causal")
    trunk = {k: v for k, v in saved.items() if not fam.is_dropped(k)}
    assert trunk == fam.hf_shapes(shape)
    assert [k for k in saved if fam.is_dropped(k)] == list(fam.dropped)
    # A critique model keeps it: the table's LM head (megarm's output layer).
    assert saved == fam.hf_shapes(shape, ("lm",))


def test_a_megatron_name_has_one_rule_in_every_family():
    """The TP split and stage of a parameter do not depend on the family, so the
    sharding of full state dicts needs none."""
    from megarm.model.sharding import TE_NAMES

    seen: dict[str, tuple] = {}
    for fam in FAMILIES.values():
        for rule in fam.weights:
            for name in {rule.local, rule.te_name}:
                what = (rule.tp, rule.part)
                assert seen.setdefault(name, what) == what, name
                assert megatron_rule(name.format(i=7, e=3)).tp == rule.tp
    assert TE_NAMES == {
        "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
        "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    }
    with pytest.raises(KeyError):  # DeepSeek's latent attention (MLA): no family has it
        megatron_rule("decoder.layers.0.self_attention.linear_q_down_proj.weight")
    expert = megatron_rule("decoder.layers.3.mlp.experts.local_experts.5.linear_fc1.weight")
    assert (expert.tp, expert.part, expert.kind) == ("fc1", "layer", "fc1-cat")
    assert megatron_rule("decoder.layers.0.mlp.router.weight").tp is None
    assert megatron_rule(head_weight("lm")).tp == 0  # vocab-parallel, as the embedding
    assert megatron_rule(head_weight("value")).part == "final"


def test_detect_reads_model_type_and_architecture():
    assert detect(QWEN3_8B).name == "qwen3" and detect(LLAMA32_1B).name == "llama"
    assert detect({"architectures": ["LlamaForSequenceClassification"]}).name == "llama"
    assert detect({}).name == "qwen2"  # megarm's first checkpoints name neither


# --------------------------------------------------------------------------- RoPE, QK-norm


ROPE_CASES = [  # (theta, head dim, factor, low, high, original context)
    (500000.0, 128, 8.0, 1.0, 4.0, 8192),  # Llama 3.1
    (500000.0, 64, 32.0, 1.0, 4.0, 8192),  # Llama 3.2 1B
    (10000.0, 16, 4.0, 2.0, 8.0, 64),  # not megatron-core's fixed 1 / 4 / 8192
]


def _megarm_rope_and_qk_norm() -> dict:
    """inv_freq of megarm's model for each case; the QK-norm modules of a Qwen3 trunk
    (built after a teardown and a second init in the same process)."""
    from megarm import distributed
    from megarm.model.builder import build_model, transformer_config
    from megarm.model.norm import RMSNorm
    from tests.helpers import tiny_config

    distributed.init(1, 1)
    freqs = []
    for theta, d, factor, low, high, original in ROPE_CASES:
        cfg = tiny_config(
            "model.family=llama", f"model.rotary_base={theta}", f"model.kv_channels={d}",
            "model.use_rope_scaling=true", f"model.rope_scaling_factor={factor}",
            f"model.rope_low_freq_factor={low}", f"model.rope_high_freq_factor={high}",
            f"model.rope_original_max_positions={original}",
        )
        (model,) = build_model(cfg, device="meta")
        freqs.append(model.rotary_pos_emb.inv_freq.clone())
    # A second init after teardown, as a converter does for each model in one process.
    distributed.teardown()
    distributed.init(1, 1)
    cfg = tiny_config("model.family=qwen3", "model.kv_channels=24")
    (model,) = build_model(cfg, device="meta")
    attention = model.decoder.layers[0].self_attention
    norms = [attention.q_layernorm, attention.k_layernorm]
    return {
        "freqs": freqs,
        "qk_norm": [(type(n) is RMSNorm, tuple(n.weight.shape)) for n in norms],
        "qk_layernorm": transformer_config(cfg).qk_layernorm,
        "plain": not any(
            "layernorm" in name
            for name, _ in build_model(tiny_config("model.family=llama"), device="meta")[0]
            .decoder.layers[0].self_attention.named_parameters()
        ),
    }


def test_llama3_rope_frequencies_equal_transformers_and_qwen3_has_qk_norm():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    (got,) = run_distributed(_megarm_rope_and_qk_norm, 1)
    for (theta, d, factor, low, high, original), freqs in zip(ROPE_CASES, got["freqs"]):
        config = LlamaConfig(
            hidden_size=4 * d, num_attention_heads=4, head_dim=d, rope_theta=theta,
            rope_scaling={"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                          "high_freq_factor": high, "original_max_position_embeddings": original},
        )
        expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
        assert torch.equal(freqs, expected.float()), (theta, d)
        plain = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
        wavelength = 2 * torch.pi / plain
        # The case has teeth: kept, divided and interpolated frequencies all occur.
        assert (wavelength < original / high).any() and (wavelength > original / low).any()
        band = (wavelength >= original / high) & (wavelength <= original / low)
        assert band.any() and not torch.equal(freqs, plain)
    assert got["qk_norm"] == [(True, (24,)), (True, (24,))]
    assert got["qk_layernorm"] and got["plain"]


# --------------------------------------------------------------------------- structure

# What "spelled" means: the family tables (megarm/families/) are the only production
# code with these in a string literal (docstrings excepted: documentation may name
# them) or, for HF config keys, as a keyword argument or attribute name.
# (Not attention_bias: megatron-core's attention takes an argument of that name too.)
HF_CONFIG_KEYS = (
    "num_hidden_layers", "intermediate_size", "num_key_value_heads", "rope_theta",
    "rms_norm_eps", "rope_scaling", "rope_parameters", "use_sliding_window", "sliding_window",
    "max_window_layers", "layer_types", "mlp_bias", "num_experts", "num_local_experts",
    "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
    "norm_topk_prob", "router_aux_loss_coef", "decoder_sparse_step", "mlp_only_layers",
    "n_routed_experts", "kv_lora_rank",
    "hidden_act", "head_dim", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings",
)
# Also a name in other code (megarm's head_dim()): only its string spelling counts.
_LITERAL_ONLY = {"head_dim"}
WEIGHT_NAMES = (
    # HF
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    "embed_tokens", "post_attention_layernorm", "lm_head", "q_norm", "k_norm", "model.norm",
    "score.weight",
    # megatron-core / megarm
    "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "word_embeddings",
    "final_layernorm", "pre_mlp_layernorm", "input_layernorm", "layer_norm_weight",
    "q_layernorm", "k_layernorm", "value_head.weight",
    "shared_expert_gate", "shared_expert", "local_experts", "shared_experts", "mlp.router",
    "mlp.gate",
)
_SPELLED = re.compile(r"\b(" + "|".join(map(re.escape, HF_CONFIG_KEYS + WEIGHT_NAMES)) + r")\b")
PRODUCTION = ("megarm", "ckpt_convert", "tools")
# Known exceptions, each with its reason. The model's own definition names the
# parameters it creates; the critique-model work in progress (output layer, SFT
# checkpoints) still spells the head names in the training loop (to move onto
# megarm.families.head_weight).
ALLOWED = {
    ("megarm/model/reward_model.py", "value_head.weight"),
    ("megarm/model/reward_model.py", "word_embeddings"),
}


def _sources():
    for top in PRODUCTION:
        for path in sorted((ROOT / top).rglob("*.py")):
            yield path, ast.parse(path.read_text())


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if not isinstance(body, list):
            continue
        for i, stmt in enumerate(body):
            first = i == 0 and isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            after_field = i > 0 and isinstance(body[i - 1], (ast.Assign, ast.AnnAssign))
            if (first or after_field) and isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
                found.add(id(stmt.value))
    return found


def test_the_family_tables_are_the_only_place_hf_keys_and_weight_names_are_spelled():
    spelled = []
    for path, tree in _sources():
        rel = path.relative_to(ROOT)
        if rel.parts[:2] == ("megarm", "families"):
            continue
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            hits: list[str] = []
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                hits = _SPELLED.findall(node.value)
            elif isinstance(node, ast.keyword) and node.arg in HF_CONFIG_KEYS:
                hits = [node.arg]
            elif isinstance(node, ast.Attribute) and node.attr in HF_CONFIG_KEYS:
                hits = [node.attr]
            hits = [h for h in hits if isinstance(node, ast.Constant) or h not in _LITERAL_ONLY]
            hits = [h for h in hits if (str(rel), h) not in ALLOWED]
            spelled += [f"{rel}:{node.lineno}: {hit}" for hit in hits]
    assert not spelled, "spelled outside megarm/families:\n" + "\n".join(spelled)
    # The walk has teeth: the tables themselves are full of these spellings.
    table = (ROOT / "megarm/families/common.py").read_text()
    assert len(set(_SPELLED.findall(table))) > 20


def _imports(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def test_imports_follow_the_layers():
    """Conversion and scoring do not depend on training (the step is the model's);
    production code never imports the test harness; the family tables import no torch."""
    problems = []
    for path, tree in _sources():
        rel = str(path.relative_to(ROOT))
        names = _imports(tree)
        if rel.startswith("ckpt_convert/"):
            problems += [f"{rel}: {n}" for n in names if n.startswith("megarm.training")]
        if rel == "megarm/score.py" or rel.startswith("megarm/rewards/"):
            problems += [f"{rel}: {n}" for n in names if n.startswith("megarm.training")]
        if rel != "megarm/testing.py":
            problems += [f"{rel}: {n}" for n in names if n.startswith("megarm.testing")]
        if rel.startswith("megarm/families/"):
            problems += [f"{rel}: {n}" for n in names if n.split(".")[0] == "torch"]
    assert not problems, problems
    assert not (ROOT / "megarm/training/checkpointing.py").exists()


def test_the_config_validator_and_the_families_import_no_torch():
    code = ("import sys, megarm.config, megarm.families;"
            "from megarm.config import load_config;"
            "load_config(None, ['model.family=llama', 'model.use_rope_scaling=true']);"
            "assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
