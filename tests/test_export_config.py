"""The export's config.json read as transformers 4.x reads it (issue 24, section 3).

transformers 5 keeps the RoPE base only under ``rope_parameters``; 4.x (RewardBench
0.1.4 pins 4.51, OpenRLHF and verl releases, older vLLM) does not read that key and
silently uses its default base 10000: every reward wrong, no warning. For each
family's published config.json, the config megarm's export writes
(:func:`ckpt_convert.mcore2hf.hf_config` then ``write_legacy_keys``, what
``mcore2hf.py`` runs) is read here with 4.51's own defaults for absent keys, and every
key 4.x reads must equal what megarm trained with; every key of the source stays; and
transformers 5 still reads the same model from it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from megarm.config import load_config
from megarm.families import FAMILIES
from tests.test_config_sources import QWEN25_05B
from tests.test_families import LLAMA31_8B, LLAMA32_1B, QWEN3_06B, QWEN3_30B_A3B, QWEN15_MOE_A27B

# Qwen2.5-7B-Instruct's published config.json, as it is (sliding_window beyond the
# context: no window).
QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 3584,
    "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 32768,
    "max_window_layers": 28, "model_type": "qwen2", "num_attention_heads": 28,
    "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.43.1", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 152064,
}
PUBLISHED = {
    "qwen2.5-7b": QWEN25_7B,
    # Qwen2.5-0.5B as megarm's tests spell it (no window keys): 4.51's default window
    # 4096 would mask long sequences; the export must say null.
    "qwen2.5-0.5b": QWEN25_05B,
    "qwen3-0.6b": QWEN3_06B,
    "llama3.1-8b": LLAMA31_8B,
    "llama3.2-1b": LLAMA32_1B,
    "qwen3-30b-a3b": QWEN3_30B_A3B,
    "qwen1.5-moe-a2.7b": QWEN15_MOE_A27B,
}

# transformers 4.51's defaults for the keys below (its config classes' signatures):
# what 4.x uses when the export's config.json lacks the key.
V4_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen2": {"rope_theta": 10000.0, "sliding_window": 4096, "use_sliding_window": False,
              "max_window_layers": 28},
    "qwen3": {"rope_theta": 10000.0, "sliding_window": 4096, "use_sliding_window": False,
              "max_window_layers": 28},
    "llama": {"rope_theta": 10000.0},
    "qwen3_moe": {"rope_theta": 10000.0, "sliding_window": 4096, "use_sliding_window": False,
                  "max_window_layers": 28, "num_experts": 128},
    "qwen2_moe": {"rope_theta": 10000.0, "sliding_window": 4096, "use_sliding_window": False,
                  "max_window_layers": 28, "num_experts": 60},
}
V4_DEFAULT_COMMON = {"rope_scaling": None, "torch_dtype": None, "rms_norm_eps": 1e-6,
                     "tie_word_embeddings": False}


def v4(config: dict[str, Any], key: str) -> Any:
    """``key`` as transformers 4.51 sees it: the top-level value, else its default."""
    if key in config:
        return config[key]
    defaults = {**V4_DEFAULT_COMMON, **V4_DEFAULTS[config["model_type"]]}
    if key not in defaults:
        raise AssertionError(f"{key} absent and 4.51 has no default for it: it fails to load")
    return defaults[key]


def export_config(tmp_path: Path, published: dict[str, Any], dtype: torch.dtype) -> tuple[Any, dict]:
    """(megarm's ModelConfig read from ``published``, the export's config.json)."""
    from ckpt_convert import mcore2hf

    source = tmp_path / "source"
    source.mkdir()
    (source / "config.json").write_text(json.dumps(published))
    model = load_config(None, [f"model.hf_config={source}"]).model
    out = tmp_path / "export"
    config = mcore2hf.hf_config(model, published, 7, dtype)
    config.save_pretrained(str(out))
    mcore2hf.write_legacy_keys(out, model, published, dtype)
    return model, json.loads((out / "config.json").read_text())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_transformers_4_reads_what_megarm_trained_with(tmp_path, name):
    published = PUBLISHED[name]
    model, config = export_config(tmp_path, published, torch.bfloat16)
    family = FAMILIES[model.family]
    trained = {
        "num_hidden_layers": model.num_layers, "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups, "vocab_size": model.vocab_size,
        "max_position_embeddings": model.max_position_embeddings,
        "rms_norm_eps": model.norm_epsilon, "tie_word_embeddings": model.tie_word_embeddings,
        "rope_theta": model.rotary_base, "torch_dtype": "bfloat16",
    }
    if model.use_rope_scaling:
        trained["rope_scaling"] = {
            "rope_type": "llama3", "factor": model.rope_scaling_factor,
            "low_freq_factor": model.rope_low_freq_factor,
            "high_freq_factor": model.rope_high_freq_factor,
            "original_max_position_embeddings": model.rope_original_max_positions,
        }
    else:
        trained["rope_scaling"] = None
    if family.moe:
        trained["num_experts"] = model.num_moe_experts
    for key, value in trained.items():
        assert v4(config, key) == value, (name, key, v4(config, key), value)
    # The published values themselves (not only megarm's reading of them).
    assert v4(config, "rope_theta") == published["rope_theta"]
    assert v4(config, "rope_scaling") == published.get("rope_scaling")
    if family.windowed:
        # megarm attends over the whole sequence: 4.x must apply no window.
        assert v4(config, "use_sliding_window") is False
        window = v4(config, "sliding_window")
        assert window is None or window >= model.max_position_embeddings, (name, window)
        assert isinstance(v4(config, "max_window_layers"), int)
        if "max_window_layers" in published:
            assert v4(config, "max_window_layers") == published["max_window_layers"]
    # Every key of the source stays (the class and version are the export's own).
    for key, value in published.items():
        assert key in config, (name, key)
        if key not in ("architectures", "transformers_version", "torch_dtype"):
            assert config[key] == value or key == "sliding_window", (name, key, config[key], value)
    assert config["architectures"] == [family.sequence_classification]
    assert config["dtype"] == "bfloat16"


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_transformers_5_reads_the_same_model_from_it(tmp_path, name):
    """The legacy keys beside ``rope_parameters`` change nothing transformers 5 reads."""
    from transformers import AutoConfig

    model, config = export_config(tmp_path, PUBLISHED[name], torch.float32)
    ours = AutoConfig.from_pretrained(str(tmp_path / "export"))
    assert ours.rope_parameters["rope_theta"] == model.rotary_base
    assert ours.rope_parameters["rope_type"] == ("llama3" if model.use_rope_scaling else "default")
    assert not getattr(ours, "sliding_window", None)  # None (qwen2_moe in transformers 5: 0)
    back = load_config(None, [f"model.hf_config={tmp_path / 'export'}"]).model
    back.hf_config = model.hf_config
    # The export spells head_dim out; absent in the source, megarm derived the same.
    if model.kv_channels is None:
        back.kv_channels = None
    assert back == model
    # The config transformers 5 would have written alone reads the same.
    plain = tmp_path / "plain"
    from ckpt_convert import mcore2hf

    mcore2hf.hf_config(model, PUBLISHED[name], 7, torch.float32).save_pretrained(str(plain))
    theirs = AutoConfig.from_pretrained(str(plain)).to_dict()
    mine = ours.to_dict()
    for key in set(theirs) - {"transformers_version", "_name_or_path"}:
        assert mine.get(key) == theirs[key], (name, key, mine.get(key), theirs[key])
