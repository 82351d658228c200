"""megarm.config: loading, overrides, type checks, cross-field validation, the CLI, docs."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from megarm import config as C
from megarm import preflight
from megarm.config import (
    SECTIONS,
    ConfigError,
    MegarmConfig,
    field_docs,
    load_config,
    markdown_reference,
)
from megarm.families.base import head_dim, padded_vocab_size
from megarm.preflight import resolve, validate
from tests.helpers import from_dict

ROOT = Path(__file__).resolve().parent.parent

QWEN2_TINY = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "num_hidden_layers": 3,
    "hidden_size": 96,
    "intermediate_size": 160,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "vocab_size": 1000,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}


def write_yaml(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def write_hf(tmp_path: Path, **changes) -> Path:
    model_dir = tmp_path / "hf_model"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps({**QWEN2_TINY, **changes}))
    return model_dir


def issues_of(*overrides: str, world_size: int | None = None, path=None) -> list[C.ConfigIssue]:
    """The issues ``resolve`` reports (empty when the config is valid)."""
    try:
        resolve(path, list(overrides), world_size)
    except ConfigError as exc:
        return exc.issues
    return []


def keys_of(issues) -> list[str]:
    return [issue.key for issue in issues]


def only_issue(*overrides: str, world_size: int | None = None) -> C.ConfigIssue:
    issues = issues_of(*overrides, world_size=world_size)
    assert len(issues) == 1, issues
    return issues[0]


# --------------------------------------------------------------------------- loading


def test_defaults_without_file():
    cfg = load_config()
    assert cfg == MegarmConfig()
    assert cfg.optimizer.lr == 1e-5
    assert cfg.parallel.tensor_model_parallel_size == 1


def test_yaml_values_are_loaded_and_override_wins(tmp_path):
    path = write_yaml(
        tmp_path,
        """
        training:
          seed: 7
          train_iters: 20
        optimizer:
          lr: 1e-5
          min_lr: 1.0e-7
          lr_decay_style: linear
        parallel:
          tensor_model_parallel_size: 2
        """,
    )
    cfg = load_config(path, ["training.seed=9", "optimizer.lr=3e-4"])
    assert cfg.training.seed == 9
    assert cfg.training.train_iters == 20
    assert cfg.optimizer.lr == 3e-4
    assert cfg.optimizer.min_lr == 1e-7
    assert cfg.optimizer.lr_decay_style == "linear"
    assert cfg.parallel.tensor_model_parallel_size == 2
    # untouched keys keep their defaults
    assert cfg.training.micro_batch_size == MegarmConfig().training.micro_batch_size


def test_later_override_wins_over_earlier_one():
    cfg = load_config(None, ["training.seed=1", "training.seed=2"])
    assert cfg.training.seed == 2


def test_scientific_notation_string_coerces_to_float(tmp_path):
    # PyYAML (YAML 1.1) reads "1e-5" as the string '1e-5'.
    path = write_yaml(tmp_path, "optimizer:\n  lr: 1e-5\n  adam_eps: 1e-8\n")
    cfg = load_config(path, ["optimizer.min_lr=1e-6"])
    assert cfg.optimizer.lr == 1e-5 and type(cfg.optimizer.lr) is float
    assert cfg.optimizer.adam_eps == 1e-8
    assert cfg.optimizer.min_lr == 1e-6 and type(cfg.optimizer.min_lr) is float


def test_int_is_accepted_for_float_field():
    cfg = load_config(None, ["optimizer.clip_grad=2", "model.rotary_base=10000"])
    assert cfg.optimizer.clip_grad == 2.0 and type(cfg.optimizer.clip_grad) is float
    assert cfg.model.rotary_base == 10000.0 and type(cfg.model.rotary_base) is float


def test_integral_float_is_accepted_for_int_field_but_fraction_is_not():
    assert load_config(None, ["training.train_iters=30.0"]).training.train_iters == 30
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["training.train_iters=2.5"])
    assert keys_of(exc.value.issues) == ["training.train_iters"]


def test_bool_is_rejected_for_int_field():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["training.micro_batch_size=true"])
    (issue,) = exc.value.issues
    assert issue.key == "training.micro_batch_size"
    assert "expected int" in issue.message and "True" in issue.message


def test_bool_is_rejected_for_float_and_str_is_rejected_for_bool():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["optimizer.lr=true", "parallel.sequence_parallel=maybe"])
    assert keys_of(exc.value.issues) == ["optimizer.lr", "parallel.sequence_parallel"]


def test_non_numeric_string_for_float_is_rejected():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["optimizer.lr=fast"])
    (issue,) = exc.value.issues
    assert issue.key == "optimizer.lr" and "expected float" in issue.message


def test_literal_field_rejects_other_values_naming_allowed_ones():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["optimizer.lr_decay_style=exponential"])
    (issue,) = exc.value.issues
    assert issue.key == "optimizer.lr_decay_style"
    for allowed in ("'cosine'", "'linear'", "'constant'"):
        assert allowed in issue.message
    assert "exponential" in issue.message
    assert load_config(None, ["model.params_dtype=bf16"]).model.params_dtype == "bf16"


def test_optional_field_accepts_null_and_value():
    cfg = load_config(None, ["checkpoint.save=/tmp/x", "checkpoint.save_interval=5"])
    assert cfg.checkpoint.save == "/tmp/x" and cfg.checkpoint.save_interval == 5
    cfg = load_config(None, ["model.kv_channels=null", "data.data_path="])
    assert cfg.model.kv_channels is None and cfg.data.data_path is None


def test_blend_string_override_stays_a_string():
    cfg = load_config(None, ["data.data_path=0.7 /a 0.3 /b", "data.split=90,5,5"])
    assert cfg.data.data_path == "0.7 /a 0.3 /b"
    assert cfg.data.split == "90,5,5"


# --------------------------------------------------------------------------- unknown keys


def test_unknown_key_in_wrong_section_suggests_the_right_section():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["training.lr=1"])
    (issue,) = exc.value.issues
    assert issue.key == "training.lr"
    assert "did you mean 'optimizer.lr'" in issue.message


def test_misspelt_key_suggests_the_dotted_key():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["parallel.sequence_paralel=true"])
    (issue,) = exc.value.issues
    assert issue.key == "parallel.sequence_paralel"
    assert "did you mean 'parallel.sequence_parallel'" in issue.message


def test_misspelt_key_in_yaml_is_reported_too(tmp_path):
    path = write_yaml(tmp_path, "training:\n  micro_bach_size: 4\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    (issue,) = exc.value.issues
    assert issue.key == "training.micro_bach_size"
    assert "did you mean 'training.micro_batch_size'" in issue.message


def test_unknown_section_is_named_with_suggestion_and_list():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["trainig.seed=1"])
    (issue,) = exc.value.issues
    assert issue.key == "trainig.seed"
    assert "unknown section 'trainig'" in issue.message
    assert "did you mean 'training'" in issue.message
    assert "model, parallel, data, training, optimizer, checkpoint, logging" in issue.message


def test_key_at_top_level_of_yaml_suggests_its_section(tmp_path):
    path = write_yaml(tmp_path, "lr: 0.001\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    (issue,) = exc.value.issues
    assert issue.key == "lr"
    assert "did you mean 'optimizer.lr'" in issue.message


def test_override_without_section_suggests_one():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["seed=3"])
    (issue,) = exc.value.issues
    assert "did you mean 'training.seed'" in issue.message


def test_override_without_equals_sign():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["training.seed"])
    assert "section.key=value" in exc.value.issues[0].message


def test_missing_or_malformed_config_file(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "nope.yaml")
    assert exc.value.issues[0].key == "--config"
    path = write_yaml(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(path)


# --------------------------------------------------------------------------- all at once


def test_every_problem_is_reported_at_once(tmp_path):
    path = write_yaml(
        tmp_path,
        """
        model:
          num_attention_heads: 4
          num_query_groups: 2
          num_layerz: 4
        parallel:
          tensor_model_parallel_size: 4
        training:
          micro_batch_size: 2
          global_batch_size: 6
          seed: abc
        """,
    )
    with pytest.raises(ConfigError) as exc:
        resolve(path, ["optimizer.lr_decay_style=step"], world_size=8)
    keys = keys_of(exc.value.issues)
    assert "model.num_layerz" in keys  # unknown key
    assert "training.seed" in keys  # wrong type
    assert "optimizer.lr_decay_style" in keys  # bad literal
    assert "parallel.tensor_model_parallel_size" in keys  # TP=4 vs 2 KV heads
    assert "training.global_batch_size" in keys  # 6 vs micro 2 x DP 2
    assert len(keys) == 5, exc.value.issues
    text = str(exc.value)
    assert "5 problem(s)" in text
    for key in keys:
        assert f"  - {key}: " in text


# --------------------------------------------------------------------------- cross-field checks


def test_valid_defaults_have_no_issues():
    assert validate(MegarmConfig()) == []
    assert validate(MegarmConfig(), world_size=1) == []
    assert validate(MegarmConfig(), world_size=4) == []  # DP 4: 8 % (2 * 4) == 0


def test_valid_parallel_config_has_no_issues(tmp_path):
    hf = write_hf(tmp_path)
    ckpt = tmp_path / "ckpt"
    (ckpt / "iter_0000001").mkdir(parents=True)  # a save root: the validator resolves it
    (ckpt / "latest_checkpointed_iteration.txt").write_text("1\n")
    issues = issues_of(
        f"model.hf_config={hf}",
        "model.num_layers=4",
        "data.seq_length=128",
        "parallel.tensor_model_parallel_size=2",
        "parallel.pipeline_model_parallel_size=2",
        "parallel.virtual_pipeline_model_parallel_size=2",
        "parallel.sequence_parallel=true",
        "parallel.use_distributed_optimizer=true",
        "training.micro_batch_size=1",
        "training.global_batch_size=6",
        f"checkpoint.load={ckpt}",
        f"checkpoint.save={tmp_path / 'out'}",
        "checkpoint.save_interval=10",
        world_size=12,
    )
    assert issues == []


def test_tp_must_divide_attention_heads():
    issues = issues_of(
        "model.num_attention_heads=4",
        "model.num_query_groups=4",
        "parallel.tensor_model_parallel_size=8",
    )
    msgs = [i.message for i in issues if i.key == "parallel.tensor_model_parallel_size"]
    assert any("TP=8 must divide the 4 attention heads" in m for m in msgs), issues
    assert any("allowed: 1, 2, 4" in m for m in msgs)


def test_tp_must_divide_kv_heads():
    issue = only_issue(
        "model.num_attention_heads=4",
        "model.num_query_groups=2",
        "parallel.tensor_model_parallel_size=4",
    )
    assert issue.key == "parallel.tensor_model_parallel_size"
    assert "TP=4 must divide the 2 KV heads" in issue.message
    assert "Allowed: 1, 2" in issue.message


def test_tp_must_divide_ffn_and_padded_vocab():
    issues = issues_of(
        "model.num_attention_heads=6",
        "model.num_query_groups=3",
        "model.hidden_size=96",
        "model.ffn_hidden_size=128",
        "model.vocab_size=1000",
        "model.make_vocab_size_divisible_by=128",
        "parallel.tensor_model_parallel_size=3",
    )
    assert keys_of(issues) == [
        "parallel.tensor_model_parallel_size",
        "model.make_vocab_size_divisible_by",
    ]
    assert "ffn_hidden_size 128" in issues[0].message
    assert "padded vocabulary 1024 is not divisible by TP=3" in issues[1].message


def test_kv_heads_must_divide_heads():
    issue = only_issue("model.num_attention_heads=4", "model.num_query_groups=3")
    assert issue.key == "model.num_query_groups"
    assert "3 KV heads must divide 4 attention heads" in issue.message


def test_hidden_size_must_split_into_heads_unless_kv_channels_is_set():
    issue = only_issue("model.hidden_size=66", "model.ffn_hidden_size=128")
    assert issue.key == "model.kv_channels"
    assert issues_of("model.hidden_size=66", "model.kv_channels=16") == []


def test_pp_must_divide_layers():
    issue = only_issue("model.num_layers=4", "parallel.pipeline_model_parallel_size=3")
    assert issue.key == "parallel.pipeline_model_parallel_size"
    assert "PP=3 must divide the 4 layers" in issue.message
    assert "allowed PP: 1, 2, 4" in issue.message


def test_pp_times_virtual_must_divide_layers():
    issue = only_issue(
        "model.num_layers=4",
        "parallel.pipeline_model_parallel_size=2",
        "parallel.virtual_pipeline_model_parallel_size=3",
    )
    assert issue.key == "parallel.pipeline_model_parallel_size"
    assert "PP=2 x virtual 3" in issue.message


def test_virtual_pipeline_needs_pp():
    issue = only_issue("parallel.virtual_pipeline_model_parallel_size=2", "model.num_layers=4")
    assert issue.key == "parallel.virtual_pipeline_model_parallel_size"


def test_world_size_must_be_divisible_by_tp_times_pp():
    issue = only_issue(
        "model.num_layers=4",
        "parallel.tensor_model_parallel_size=2",
        "parallel.pipeline_model_parallel_size=2",
        world_size=6,
    )
    assert issue.key == "parallel"
    assert "world size 6 is not divisible by TP x PP = 2 x 2 = 4" in issue.message
    # without a world size the layout check is skipped
    assert issues_of("parallel.tensor_model_parallel_size=2") == []


def test_global_batch_must_be_divisible_by_micro_times_dp():
    issue = only_issue(
        "training.micro_batch_size=2",
        "training.global_batch_size=12",
        "parallel.tensor_model_parallel_size=2",
        world_size=8,
    )  # DP = 8 / 2 = 4, micro x DP = 8
    assert issue.key == "training.global_batch_size"
    assert "12 is not divisible by micro_batch_size x data-parallel size = 2 x 4" in issue.message
    assert "multiple of 8" in issue.message
    assert issues_of("training.global_batch_size=12", world_size=3) == []  # 12 % (2*3) == 0


def test_sequence_parallel_needs_tp():
    issue = only_issue("parallel.sequence_parallel=true")
    assert issue.key == "parallel.sequence_parallel"
    assert (
        issues_of("parallel.sequence_parallel=true", "parallel.tensor_model_parallel_size=2") == []
    )


@pytest.mark.parametrize(
    "key", ["model.hf_config", "checkpoint.load", "data.tokenizer_name_or_path"]
)
def test_missing_path_is_named(tmp_path, key):
    missing = tmp_path / "does-not-exist"
    issues = issues_of(f"{key}={missing}")
    assert issues and set(keys_of(issues)) == {key}, issues
    assert any(str(missing) in i.message for i in issues)


def test_existing_paths_are_accepted(tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tmp_path / "iter_0000002").mkdir()  # a save root holding a checkpoint
    assert issues_of(f"checkpoint.load={tmp_path}", f"data.tokenizer_name_or_path={tok}") == []


def test_data_path_prefix_without_files_is_named(tmp_path):
    issue = only_issue(f"data.data_path={tmp_path / 'train'}")
    assert issue.key == "data.data_path"
    assert "no files" in issue.message and str(tmp_path / "train") in issue.message


def test_data_path_blend_checks_every_prefix(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    good = tmp_path / "good"
    for key in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"):
        # empty but well-formed files: the validator reads the .idx headers
        IndexedDatasetBuilder(f"{good}_packed_{key}_document.bin").finalize(
            f"{good}_packed_{key}_document.idx"
        )
    bad = tmp_path / "bad"
    Path(f"{bad}_packed_chosen_input_ids_document.idx").touch()
    Path(f"{bad}_packed_chosen_input_ids_document.bin").touch()
    assert issues_of(f"data.data_path={good}") == []
    issues = issues_of(f"data.data_path=0.5 {good} 0.5 {bad}")
    assert set(keys_of(issues)) == {"data.data_path"}
    assert len(issues) == 3  # three keys missing for the bad prefix
    assert any("rejected_labels" in i.message for i in issues)
    issue = only_issue(f"data.data_path=0.5 {good} x {bad}")
    assert issue.key == "data.data_path" and "not a number" in issue.message


def test_seq_length_above_max_positions():
    issue = only_issue("data.seq_length=4096", "model.max_position_embeddings=2048")
    assert issue.key == "data.seq_length"
    assert "4096 exceeds the model's max_position_embeddings 2048" in issue.message


@pytest.mark.parametrize("split", ["98,2", "a,b,c", "0,50,50", "90,-5,15", "0,0,0", "1,2,3,4"])
def test_bad_split_is_named(split):
    issue = only_issue(f"data.split={split}")
    assert issue.key == "data.split"
    assert repr(split) in issue.message


@pytest.mark.parametrize("split", ["98,2,0", "80/10/10", "1,0,0", "0.9,0.1,0"])
def test_good_split_is_accepted(split):
    assert issues_of(f"data.split={split}") == []


def test_save_interval_without_save():
    issue = only_issue("checkpoint.save_interval=100")
    assert issue.key == "checkpoint.save"
    assert "save_interval is set" in issue.message


def test_optimizer_and_dropout_ranges():
    issues = issues_of(
        "optimizer.lr_warmup_fraction=1.5",
        "optimizer.min_lr=1.0",
        "optimizer.clip_grad=-1",
        "model.hidden_dropout=1.0",
    )
    assert keys_of(issues) == [
        "optimizer.lr_warmup_fraction",
        "optimizer.min_lr",
        "optimizer.clip_grad",
        "model.hidden_dropout",
    ]


def test_non_positive_sizes_are_named():
    issues = issues_of("training.micro_batch_size=0", "model.num_layers=-1")
    assert keys_of(issues) == ["model.num_layers", "training.micro_batch_size"]
    assert "must be >= 1, got 0" in issues[1].message


def test_check_raises_with_every_issue():
    cfg = load_config(None, ["parallel.sequence_parallel=true", "checkpoint.save_interval=3"])
    with pytest.raises(ConfigError) as exc:
        preflight.check(cfg)
    assert keys_of(exc.value.issues) == ["parallel.sequence_parallel", "checkpoint.save"]
    assert preflight.check(MegarmConfig()) == MegarmConfig()


# --------------------------------------------------------------------------- HF config


def test_hf_config_fills_the_shape(tmp_path):
    hf = write_hf(tmp_path)
    cfg = load_config(None, [f"model.hf_config={hf}"])
    m = cfg.model
    assert m.num_layers == 3
    assert m.hidden_size == 96
    assert m.ffn_hidden_size == 160
    assert m.num_attention_heads == 6
    assert m.num_query_groups == 2
    assert m.vocab_size == 1000
    assert m.rotary_base == 10000.0
    assert m.norm_epsilon == 1e-5
    assert m.max_position_embeddings == 256
    assert m.tie_word_embeddings is True
    assert m.kv_channels is None and head_dim(m) == 16
    assert padded_vocab_size(m) == 1024
    # a model with max 256 positions rejects the default 1024-token sequences...
    assert keys_of(issues_of(f"model.hf_config={hf}")) == ["data.seq_length"]
    # ...and is valid with shorter ones, TP=2 included (6 heads, 2 groups)
    assert (
        issues_of(
            f"model.hf_config={hf}",
            "data.seq_length=256",
            "parallel.tensor_model_parallel_size=2",
            world_size=2,
        )
        == []
    )


def test_hf_config_accepts_the_json_file_itself(tmp_path):
    hf = write_hf(tmp_path)
    cfg = load_config(None, [f"model.hf_config={hf / 'config.json'}"])
    assert cfg.model.hidden_size == 96


def test_hf_head_dim_fills_kv_channels(tmp_path):
    hf = write_hf(tmp_path, head_dim=32)
    assert load_config(None, [f"model.hf_config={hf}"]).model.kv_channels == 32


def test_command_line_shape_key_wins_over_hf_config(tmp_path):
    hf = write_hf(tmp_path)
    cfg = load_config(None, [f"model.hf_config={hf}", "model.num_layers=6"])
    assert cfg.model.num_layers == 6
    assert cfg.model.hidden_size == 96  # the rest still comes from config.json
    # A YAML that disagrees with config.json is refused: tests/test_config_sources.py


def test_unknown_model_type_is_an_error(tmp_path):
    # (Llama and Qwen3 are families now: tests/test_families.py.)
    hf = write_hf(tmp_path, model_type="gemma2")
    with pytest.raises(ConfigError) as exc:
        load_config(None, [f"model.hf_config={hf}"])
    (issue,) = exc.value.issues
    assert issue.key == "model.hf_config"
    assert "'gemma2' is not supported" in issue.message


def test_hf_config_with_bad_types_is_reported(tmp_path):
    hf = write_hf(tmp_path, num_hidden_layers="three")
    with pytest.raises(ConfigError) as exc:
        load_config(None, [f"model.hf_config={hf}"])
    assert keys_of(exc.value.issues) == ["model.num_layers"]


def test_hf_config_dir_without_config_json(tmp_path):
    (tmp_path / "empty").mkdir()
    issues = issues_of(f"model.hf_config={tmp_path / 'empty'}")
    assert issues and set(keys_of(issues)) == {"model.hf_config"}
    assert "no config.json" in issues[0].message


def test_malformed_hf_config_json_is_a_config_error(tmp_path):
    hf = tmp_path / "broken"
    hf.mkdir()
    (hf / "config.json").write_text("{")
    with pytest.raises(ConfigError) as exc:
        load_config(None, [f"model.hf_config={hf}"])
    assert keys_of(exc.value.issues) == ["model.hf_config"]


# --------------------------------------------------------------------------- vocab padding


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_padded_vocab_does_not_depend_on_tp(tp):
    cfg = load_config(
        None, ["model.vocab_size=151936", f"parallel.tensor_model_parallel_size={tp}"]
    )
    assert padded_vocab_size(cfg.model) == 151936


def test_padded_vocab_rounds_up():
    cfg = load_config(None, ["model.vocab_size=151643", "model.make_vocab_size_divisible_by=128"])
    assert padded_vocab_size(cfg.model) == 151680
    cfg = load_config(None, ["model.vocab_size=250", "model.make_vocab_size_divisible_by=128"])
    assert padded_vocab_size(cfg.model) == 256


# --------------------------------------------------------------------------- serialisation


def test_yaml_and_dict_round_trip(tmp_path):
    cfg = load_config(
        None,
        ["optimizer.lr=2e-6", "data.split=90/5/5", "checkpoint.save=/x y", "model.kv_channels=8"],
    )
    path = tmp_path / "out.yaml"
    path.write_text(C.to_yaml(cfg))
    assert load_config(path) == cfg
    assert from_dict(C.to_dict(cfg)) == cfg


# --------------------------------------------------------------------------- CLI


def _cli(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "megarm.config", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    return proc, time.perf_counter() - start


BAD_TP_YAML = """
model:
  num_attention_heads: 4
  num_query_groups: 2
parallel:
  tensor_model_parallel_size: 4
"""


def test_cli_rejects_tp_above_kv_heads_fast(tmp_path):
    path = write_yaml(tmp_path, BAD_TP_YAML)
    proc, wall = _cli("--config", str(path), "--world-size", "4")
    assert proc.returncode == 2, proc.stderr
    assert "parallel.tensor_model_parallel_size" in proc.stderr
    assert "2 KV heads" in proc.stderr
    assert proc.stdout == ""
    assert wall < 2.0, f"python -m megarm.config took {wall:.2f}s"


def _main_without_torch(tmp_path: Path, argv: list[str]) -> subprocess.CompletedProcess:
    code = (
        "import sys, megarm.config.__main__ as c\n"
        f"rc = c.main({argv!r})\n"
        "assert 'torch' not in sys.modules, 'megarm.config imported torch'\n"
        "assert 'megatron' not in sys.modules, 'megarm.config imported megatron'\n"
        "sys.exit(rc)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )


def test_cli_check_never_imports_torch(tmp_path):
    path = write_yaml(tmp_path, BAD_TP_YAML)
    proc = _main_without_torch(tmp_path, ["--config", str(path), "--world-size", "4"])
    assert proc.returncode == 2, proc.stderr
    assert "parallel.tensor_model_parallel_size" in proc.stderr
    assert "AssertionError" not in proc.stderr


def test_cli_check_of_data_path_never_imports_torch(tmp_path):
    hf = write_hf(tmp_path)
    argv = [
        f"model.hf_config={hf}",
        "data.seq_length=128",
        f"data.data_path=0.5 {tmp_path / 'a'} 0.5 {tmp_path / 'b'}",
        "--world-size",
        "2",
    ]
    proc = _main_without_torch(tmp_path, argv)
    assert proc.returncode == 2, proc.stderr
    assert "data.data_path" in proc.stderr
    assert "AssertionError" not in proc.stderr


def test_cli_prints_yaml_that_round_trips(tmp_path):
    path = write_yaml(
        tmp_path,
        """
        model:
          num_layers: 4
        parallel:
          tensor_model_parallel_size: 2
          pipeline_model_parallel_size: 2
        optimizer:
          lr: 1e-5
        """,
    )
    proc, _ = _cli("--config", str(path), "--world-size", "8", "training.global_batch_size=16")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "resolved.yaml"
    out.write_text(proc.stdout)
    cfg = load_config(out)
    assert cfg == resolve(path, ["training.global_batch_size=16"], world_size=8)
    assert cfg.training.global_batch_size == 16
    assert cfg.parallel.pipeline_model_parallel_size == 2
    assert cfg.optimizer.lr == 1e-5


def test_cli_unknown_key_exit_code(tmp_path):
    proc, _ = _cli("training.lr=1")
    assert proc.returncode == 2
    assert "did you mean 'optimizer.lr'" in proc.stderr


# --------------------------------------------------------------------------- docs


def _all_config_classes() -> list[type]:
    return [MegarmConfig, *SECTIONS.values()]


@pytest.mark.parametrize("cls", _all_config_classes(), ids=lambda c: c.__name__)
def test_every_field_has_a_docstring(cls):
    docs = field_docs(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    undocumented = [n for n in names if not docs.get(n, "").strip()]
    assert undocumented == [], f"{cls.__name__} fields without a docstring: {undocumented}"
    assert (cls.__doc__ or "").strip(), f"{cls.__name__} has no class docstring"


def test_markdown_reference_lists_every_key():
    text = markdown_reference()
    for section, cls in SECTIONS.items():
        assert f"## `{section}`" in text
        for f in dataclasses.fields(cls):
            assert f"| `{f.name}` |" in text, f"{section}.{f.name} missing from the reference"
    assert "| `lr_decay_style` | one of 'cosine', 'linear', 'constant' | `\"cosine\"` |" in text


def test_docs_config_md_is_up_to_date():
    path = ROOT / "docs" / "config.md"
    hint = "docs/config.md is stale: run `python -m megarm.config --markdown > docs/config.md`"
    assert path.is_file(), hint
    assert path.read_text().rstrip("\n") == markdown_reference().rstrip("\n"), hint


def test_markdown_table_rows_have_four_columns():
    for line in markdown_reference().splitlines():
        if line.startswith("| `"):
            cells = re.split(r"(?<!\\)\|", line)[1:-1]
            assert len(cells) == 4, line


def test_hf_config_rope_parameters_of_transformers_5(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    base = {"model_type": "qwen2", "num_hidden_layers": 2, "hidden_size": 64,
            "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 256, "max_position_embeddings": 128}
    (hf / "config.json").write_text(json.dumps(
        {**base, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}))
    assert load_config(None, [f"model.hf_config={hf}"]).model.rotary_base == 500000.0
    (hf / "config.json").write_text(json.dumps(
        {**base, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}))
    with pytest.raises(ConfigError) as exc:
        load_config(None, [f"model.hf_config={hf}"])
    assert "yarn" in str(exc.value)


def test_thd_packing_needs_an_attention_that_reads_cu_seqlens():
    issue = only_issue("data.packing=true", "data.packed_format=thd", "model.attention_backend=unfused")
    assert issue.key == "data.packed_format"
    assert "data.packed_format=rows" in issue.message
    assert issues_of("data.packing=true", "data.packed_format=thd") == []
    assert issues_of("data.packing=true", "data.packed_format=rows", "model.attention_backend=unfused") == []
