"""megarm's one typed configuration: a dataclass tree, loaded from YAML, overridden
by ``section.key=value`` arguments, and validated as a whole before any process
group or model exists.

Every field carries a docstring (the string right below it); ``docs/config.md`` is
generated from them. Names follow Megatron-LM where one exists.

This module must stay importable without torch: ``python -m megarm.config`` checks
a config in well under two seconds.

    python -m megarm.config --config configs/orm_trainer_tiny.yaml \
        parallel.tensor_model_parallel_size=2 --world-size 2
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import importlib.util
import inspect
import json
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml

from megarm import families
from megarm.checkpoint.layout import CheckpointNotFoundError, resolve_checkpoint
from megarm.families.base import head_dim, padded_vocab_size


@dataclass
class ModelConfig:
    """Shape and numerics of the GPT trunk (Qwen2 / Qwen2.5 family)."""

    hf_config: str | None = None
    """HuggingFace model directory (or its config.json). When set, the shape fields
    below are read from it. A shape field the YAML also sets must agree with it (else
    an error names both values); one set on the command line wins, with a note."""

    family: Literal["qwen2", "qwen3", "llama", "qwen3_moe", "qwen2_moe"] = "qwen2"
    """Model family (:mod:`megarm.families`): the HF architecture the weights convert
    from and export to, and the fields it fixes. ``qwen2``: Qwen2 / Qwen2.5 (QKV
    bias); ``qwen3``: Qwen3 dense (QK-norm, no bias); ``llama``: Llama 3.x (no bias,
    optional Llama-3 RoPE scaling); ``qwen3_moe``: Qwen3-MoE (Qwen3's attention, routed
    experts); ``qwen2_moe``: Qwen2-MoE (Qwen2's attention, routed experts and a gated
    shared expert). Read from ``model.hf_config``'s ``model_type``; setting it sets
    ``add_qkv_bias`` and ``qk_layernorm`` to the family's values."""

    num_layers: int = 2
    """Number of transformer layers (HF ``num_hidden_layers``)."""

    hidden_size: int = 64
    """Hidden size H (HF ``hidden_size``)."""

    ffn_hidden_size: int = 128
    """SwiGLU intermediate size (HF ``intermediate_size``)."""

    num_attention_heads: int = 4
    """Number of query heads (HF ``num_attention_heads``)."""

    num_query_groups: int = 2
    """Number of key/value heads for grouped-query attention (HF ``num_key_value_heads``)."""

    kv_channels: int | None = None
    """Head dimension; ``null`` means hidden_size / num_attention_heads (HF ``head_dim``)."""

    vocab_size: int = 151936
    """Vocabulary size of the embedding (HF ``vocab_size``); padded up to
    ``make_vocab_size_divisible_by``."""

    make_vocab_size_divisible_by: int = 128
    """Pad the vocabulary to a multiple of this. The padding never depends on the
    tensor-parallel size, so checkpoints reshard freely."""

    max_position_embeddings: int = 32768
    """Longest sequence the RoPE model supports (HF ``max_position_embeddings``)."""

    rotary_base: float = 1000000.0
    """RoPE base theta (HF ``rope_theta``; 1e6 for Qwen2.5)."""

    use_rope_scaling: bool = False
    """Llama 3.1's RoPE frequency scaling (HF ``rope_type: llama3``; family ``llama``
    only): frequencies with wavelengths beyond ``rope_original_max_positions /
    rope_low_freq_factor`` are divided by ``rope_scaling_factor``, those below
    ``rope_original_max_positions / rope_high_freq_factor`` kept, and the band between
    interpolated, as transformers computes it."""

    rope_scaling_factor: float = 8.0
    """With ``use_rope_scaling``: the factor low frequencies are divided by (HF
    ``factor``; 8 in Llama 3.1, 32 in Llama 3.2)."""

    rope_low_freq_factor: float = 1.0
    """With ``use_rope_scaling``: HF ``low_freq_factor`` (1 in Llama 3.1 / 3.2)."""

    rope_high_freq_factor: float = 4.0
    """With ``use_rope_scaling``: HF ``high_freq_factor`` (4 in Llama 3.1 / 3.2)."""

    rope_original_max_positions: int = 8192
    """With ``use_rope_scaling``: the context length the model was pre-trained with
    before scaling (HF ``original_max_position_embeddings``; 8192 in Llama 3.1 / 3.2)."""

    norm_epsilon: float = 1e-6
    """RMSNorm epsilon (HF ``rms_norm_eps``)."""

    add_qkv_bias: bool = True
    """Bias on the Q, K, V projections (Qwen2 has it; no other linear has a bias).
    Fixed by ``family``."""

    qk_layernorm: bool = False
    """QK-norm: an RMSNorm over the head dimension applied to every query and key head
    before RoPE, one weight shared by the heads (Qwen3; megatron-core's
    ``qk_layernorm``). Fixed by ``family``."""

    num_moe_experts: int | None = None
    """Routed experts per layer of a mixture-of-experts trunk (HF ``num_experts``;
    families ``qwen3_moe`` / ``qwen2_moe``, where every layer is a megatron-core
    ``MoELayer``). ``null``: a dense trunk."""

    moe_router_topk: int = 2
    """Experts each token is routed to (HF ``num_experts_per_tok``)."""

    moe_ffn_hidden_size: int | None = None
    """One routed expert's SwiGLU intermediate size (HF ``moe_intermediate_size``)."""

    moe_shared_expert_intermediate_size: int | None = None
    """The shared expert's intermediate size (HF ``shared_expert_intermediate_size``;
    ``qwen2_moe`` only, whose shared expert is scaled by a sigmoid gate)."""

    moe_norm_topk_prob: bool = False
    """Renormalise the top-k routing probabilities to sum to one (HF
    ``norm_topk_prob``: true in Qwen3-MoE, false in Qwen2-MoE): megatron-core's top-k
    of the router logits then a softmax over them; false: a softmax over every expert,
    then the top-k (``moe_router_pre_softmax``)."""

    moe_aux_loss_coeff: float = 0.001
    """Coefficient of megatron-core's load-balancing auxiliary loss (HF
    ``router_aux_loss_coef``), whose gradient is added to the reward loss's in
    training; 0 turns it off."""

    tie_word_embeddings: bool = False
    """Whether the HF model ties its LM head to the embedding. A pure reward model
    (``training.objective: rm``) has no LM head and only exports it in the HF config;
    with ``sft`` or ``joint`` the output layer is the input embedding when this is
    true (a copy kept in step on the last pipeline stage, as in megatron-core's
    GPTModel), else a weight of its own."""

    init_method_std: float = 0.02
    """Std of the normal init for a randomly initialised trunk."""

    params_dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Parameter dtype. ``auto``: bf16 with fp32 main weights on CUDA, fp32 on CPU.
    ``bf16`` trains through megatron-core's mixed-precision optimizer (fp32 main
    weights and gradient reduction) on CPU as well. ``fp16`` is refused: it needs
    dynamic loss scaling, which megarm does not run; use bf16."""

    attention_dropout: float = 0.0
    """Dropout on attention probabilities (off for reward models)."""

    hidden_dropout: float = 0.0
    """Dropout on hidden states (off for reward models)."""

    recompute_granularity: Literal["selective", "full"] | None = None
    """Activation recomputation: ``selective`` recomputes core attention in the
    backward, ``full`` recomputes whole layers (see recompute_method). ``null``: off."""

    recompute_method: Literal["uniform", "block"] = "uniform"
    """With full recompute: ``uniform`` checkpoints groups of recompute_num_layers
    layers, ``block`` the first recompute_num_layers layers of each stage."""

    recompute_num_layers: int = 1
    """Layers per recompute group (uniform) or recomputed layers per stage (block)."""

    attention_backend: Literal["auto", "sdpa", "unfused"] = "auto"
    """Core attention for the local layer spec: ``sdpa`` uses torch's fused
    scaled_dot_product_attention, ``unfused`` megatron-core's DotProductAttention.
    ``auto``: transformer-engine when importable on CUDA, else sdpa."""


@dataclass
class ParallelConfig:
    """How the model and data are split over ranks."""

    tensor_model_parallel_size: int = 1
    """Tensor-parallel size TP; must divide attention heads and KV heads."""

    pipeline_model_parallel_size: int = 1
    """Pipeline-parallel size PP; must divide the number of layers."""

    virtual_pipeline_model_parallel_size: int | None = None
    """Model chunks per pipeline rank for the interleaved 1F1B schedule (``null``: off)."""

    sequence_parallel: bool = False
    """Shard layer-norm / dropout activations over the sequence (needs TP > 1)."""

    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (ZeRO-1)."""

    expert_model_parallel_size: int = 1
    """Expert-parallel size EP of a mixture-of-experts trunk: each EP rank holds
    ``num_moe_experts / EP`` of every layer's experts and tokens travel to them by
    all-to-all. Must divide the experts, and the world with TP x PP (expert layers use
    TP x EP x PP x expert-data-parallel ranks)."""


@dataclass
class DataConfig:
    """Where the preprocessed pairs are and how they become micro-batches."""

    data_path: str | None = None
    """Prefix of files written by tools/preprocess_data.py, or a Megatron-style blend
    ``"0.7 /data/a 0.3 /data/b"``. ``null`` trains on generated synthetic pairs (for a
    model of 100M+ parameters only with ``allow_synthetic``)."""

    allow_synthetic: bool = False
    """Let a model of 100M+ parameters (every shipped Qwen2.5 size) train on synthetic
    pairs (``data_path: null``), e.g. for a benchmark or smoke test. Smaller models
    always may; without this a real-size model must name its data."""

    split: str = "98,2,0"
    """Train/validation/test weights, split deterministically in file order."""

    seq_length: int = 1024
    """Longest sequence (prompt + response) in tokens; batches pad to the longest row."""

    tokenizer_name_or_path: str | None = None
    """HF tokenizer directory. When set, training checks before its first step that it
    is the tokenizer the data was made with (its vocabulary hash against the
    dataset's stats.json) and that it fits ``model.vocab_size``."""

    synthetic_num_pairs: int = 512
    """Number of generated pairs when ``data_path`` is null."""

    packing: bool = False
    """Pack the chosen and rejected sequences of a micro-batch's pairs together
    (positions restart per sequence, attention stays within it) instead of padding
    every sequence to the longest; ``packed_format`` says how."""

    packed_format: Literal["auto", "rows", "thd"] = "auto"
    """How packed sequences reach attention. ``rows``: rows of ``seq_length`` tokens
    with a dense block-diagonal causal mask (any attention backend). ``thd``: all of
    a micro-batch's sequences in one stream with ``cu_seqlens`` (megatron-core's
    THD format; transformer-engine's fused varlen attention, or megarm's SDPA), no
    mask tensor and no row padding; SDPA attends segment by segment, so attention
    costs sum(s_i^2) instead of rows*s^2. ``auto``: ``thd``, except ``rows`` with
    ``model.attention_backend: unfused`` (it cannot read cu_seqlens)."""


@dataclass
class TrainingConfig:
    """The schedule of the run."""

    micro_batch_size: int = 2
    """Preference pairs per micro-batch per data-parallel rank (2x rows: chosen and
    rejected go through one forward)."""

    global_batch_size: int = 8
    """Pairs per optimizer step over all data-parallel ranks and accumulation steps."""

    train_iters: int = 10
    """Number of optimizer steps."""

    seed: int = 1234
    """Seed for initialisation, data order and every RNG."""

    deterministic: bool = False
    """Deterministic kernels (``torch.use_deterministic_algorithms`` and a fixed cuBLAS
    workspace): bitwise-reproducible GPU runs, e.g. to check an exact resume, at some
    speed cost. CPU runs are deterministic without it."""

    log_interval: int = 1
    """Print a metrics line every this many iterations."""

    eval_interval: int = 0
    """Evaluate on the validation split every this many iterations (0: only at the end)."""

    eval_iters: int = 4
    """Global batches per evaluation (fewer when the validation split is smaller)."""

    eval_benchmark: str | None = None
    """A benchmark file scored at every evaluation, with the model being trained:
    RewardBench, RewardBench 2, RM-Bench or plain pairs (jsonl/json/parquet; the
    formats of ``python -m megarm.evaluate``). Its per-subset accuracies and scores
    are logged as ``benchmark/...``. Needs ``data.tokenizer_name_or_path`` and a
    value head (objective ``rm`` or ``joint``)."""

    eval_benchmark_format: Literal["auto", "rewardbench", "rewardbench2", "rmbench", "pairs"] = "auto"
    """Format of ``eval_benchmark`` (``auto``: told from its fields)."""

    exit_interval: int | None = None
    """Stop (after saving) when the iteration is a multiple of this."""

    exit_duration_in_mins: float | None = None
    """Stop (after saving) after this many minutes of wall time."""

    objective: Literal["rm", "sft", "joint"] = "rm"
    """What the model learns. ``rm``: a reward model, the Bradley-Terry loss on
    preference pairs (the value head only; no vocabulary-sized output layer is
    built). ``sft``: supervised fine-tuning, the next-token cross-entropy on the
    supervised (label) tokens of SFT records (the output layer only), e.g. CLoud's
    stage 1 on critiques. ``joint``: both heads on preference pairs,
    ``rm_loss_weight * BT + lm_loss_weight * LM`` with the LM loss over each side's
    supervised tokens (a critique, or a generated reason), as CLoud's stage 3 and
    WorldPM-style training. The LM loss is the mean over the supervised tokens of
    the whole global batch."""

    lm_loss_weight: float = 0.3
    """Weight of the LM (cross-entropy) loss in ``objective: joint``."""

    rm_loss_weight: float = 0.7
    """Weight of the pairwise (Bradley-Terry) loss in ``objective: joint``."""


@dataclass
class OptimizerConfig:
    """Adam, learning-rate schedule and clipping."""

    lr: float = 1e-5
    """Peak learning rate."""

    min_lr: float = 0.0
    """Learning rate at the end of the decay."""

    lr_warmup_fraction: float = 0.03
    """Fraction of train_iters spent in linear warm-up."""

    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay from ``lr`` to ``min_lr`` after warm-up."""

    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW)."""

    adam_beta1: float = 0.9
    """Adam beta1."""

    adam_beta2: float = 0.95
    """Adam beta2."""

    adam_eps: float = 1e-8
    """Adam epsilon."""

    clip_grad: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""


@dataclass
class CheckpointConfig:
    """Loading and saving megatron-core torch_dist checkpoints."""

    load: str | None = None
    """Checkpoint directory to start from (converted weights or a previous run)."""

    save: str | None = None
    """Directory to save checkpoints into (``null``: never save)."""

    save_interval: int | None = None
    """Save every this many iterations (and always at the end when ``save`` is set)."""

    finetune: bool = False
    """Load weights only and start at iteration 0."""

    ckpt_step: int | None = None
    """Iteration to load instead of the latest."""

    keep_last: int | None = None
    """Keep only the newest N checkpoints (older ones removed after a newer one is complete)."""

    allow_random_init: bool = False
    """Let a model of 100M+ parameters (every shipped Qwen2.5 size) start from random
    weights (``load: null``), e.g. for a benchmark or smoke test. Smaller models always
    may; without this a real-size model must load converted weights or a run."""

    verify: Literal["checksum", "size"] = "checksum"
    """How a loaded checkpoint is checked against the integrity manifest written at
    save: ``checksum`` reads every file once (xxh3, shared over the ranks), ``size``
    only compares file sizes. Unsafe pickles and non-finite weights are refused either way."""

    allow_data_change: bool = False
    """Resume (optimizer, scheduler, data position) although data.data_path, data.split
    or training.seed differ from the run that saved the checkpoint. Without it such a
    resume is refused naming both values; ``finetune`` loads weights only."""


@dataclass
class LoggingConfig:
    """Run outputs."""

    log_dir: str | None = None
    """Directory for metrics.jsonl, TensorBoard events and the resolved config.yaml."""

    tensorboard: bool = True
    """Write TensorBoard scalars under ``<log_dir>/tensorboard``."""

    wandb_project: str | None = None
    """Weights & Biases project: when set, the metrics also go to W&B (the optional
    ``wandb`` package: ``pip install 'megarm[wandb]'``). ``null``: no W&B."""

    wandb_entity: str | None = None
    """W&B team or user owning the project (``null``: your default entity)."""

    wandb_name: str | None = None
    """W&B run name (``null``: W&B picks one)."""

    wandb_dir: str | None = None
    """Directory for W&B's local files (``null``: ``<log_dir>``, else W&B's default)."""

    wandb_mode: Literal["online", "offline", "disabled"] | None = None
    """W&B mode; ``offline`` writes runs to sync later with ``wandb sync``. ``null``:
    the ``WANDB_MODE`` environment variable, else online."""


@dataclass
class MegarmConfig:
    """The whole configuration of a megarm run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Trunk shape and numerics."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor / pipeline / data parallel layout."""

    data: DataConfig = field(default_factory=DataConfig)
    """Dataset and batching."""

    training: TrainingConfig = field(default_factory=TrainingConfig)
    """Iterations, batch sizes, seed, logging and evaluation cadence."""

    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer and learning-rate schedule."""

    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint load/save."""

    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics and run outputs."""


SECTIONS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(MegarmConfig)}
SECTIONS = {name: globals()[tp] if isinstance(tp, str) else tp for name, tp in SECTIONS.items()}

# --------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class ConfigIssue:
    """One problem with a configuration: the key it concerns and how to fix it."""

    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


class ConfigError(ValueError):
    """The configuration has one or more problems; all of them are listed."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = list(issues)
        lines = "\n".join(f"  - {issue}" for issue in self.issues)
        super().__init__(f"invalid megarm config ({len(self.issues)} problem(s)):\n{lines}")


# --------------------------------------------------------------------------- docs


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a config dataclass, by field name."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def describe_type(tp: Any) -> str:
    """A short human name for a field type (``int | null``, ``one of 'a', 'b'``)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else describe_type(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


# --------------------------------------------------------------------------- coercion


class _BadValue(Exception):
    pass


def _coerce(value: Any, tp: Any) -> Any:
    """Convert a YAML value to ``tp`` or raise _BadValue."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg)
            except _BadValue:
                pass
        raise _BadValue
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise _BadValue
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _BadValue
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _BadValue
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
            try:
                return float(value)
            except ValueError:
                raise _BadValue from None
        raise _BadValue
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise _BadValue
    raise _BadValue


# --------------------------------------------------------------------------- loading


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _all_keys() -> list[str]:
    return [f"{s}.{k}" for s, cls in SECTIONS.items() for k in _hints(cls)]


def _apply(
    cfg: MegarmConfig, section: str, key: str, value: Any, issues: list[ConfigIssue]
) -> bool:
    """Set ``section.key = value`` with type checking; record an issue on failure."""
    if section not in SECTIONS:
        dotted = f"{section}.{key}" if key else section
        bare = [k.split(".", 1)[1] for k in _all_keys()]
        hint = _suggest(section, list(SECTIONS))
        if not hint and section in bare:
            owner = next(k for k in _all_keys() if k.endswith("." + section))
            hint = f" (did you mean '{owner}'?)"
        issues.append(
            ConfigIssue(dotted, f"unknown section '{section}'{hint}; sections: {', '.join(SECTIONS)}")
        )
        return False
    cls = SECTIONS[section]
    hints = _hints(cls)
    if key not in hints:
        elsewhere = [s for s, c in SECTIONS.items() if key in _hints(c)]
        hint = f" (did you mean '{elsewhere[0]}.{key}'?)" if elsewhere else _suggest(key, list(hints))
        if hint.startswith(" (did you mean '") and not elsewhere:
            hint = hint.replace("'", f"'{section}.", 1)
        issues.append(ConfigIssue(f"{section}.{key}", f"unknown key{hint}"))
        return False
    try:
        coerced = _coerce(value, hints[key])
    except _BadValue:
        issues.append(
            ConfigIssue(
                f"{section}.{key}",
                f"expected {describe_type(hints[key])}, got {value!r} "
                f"({type(value).__name__})",
            )
        )
        return False
    setattr(getattr(cfg, section), key, coerced)
    return True


def parse_override(text: str) -> tuple[str, str, Any]:
    """``section.key=value`` -> (section, key, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError([ConfigIssue(text, "an override must look like section.key=value")])
    dotted, raw = text.split("=", 1)
    if "." not in dotted:
        raise ConfigError(
            [ConfigIssue(dotted, f"overrides name a section too{_dotted_hint(dotted)}")]
        )
    section, key = dotted.strip().split(".", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return section, key, value


def _dotted_hint(key: str) -> str:
    owners = [k for k in _all_keys() if k.endswith("." + key)]
    return f" (did you mean '{owners[0]}'?)" if owners else ""


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | None = None
) -> MegarmConfig:
    """Build the config from defaults, an optional YAML file and overrides.

    Raises :class:`ConfigError` listing every unknown key and wrong type. Model
    shape fields are then filled from ``model.hf_config`` when it is set (a YAML key
    that disagrees with it is an error; a command-line override wins, with a note).
    :func:`resolve` also runs the cross-field checks.
    """
    cfg, issues = _load(path, overrides)
    if issues:
        raise ConfigError(issues)
    return cfg


def resolve(
    path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    world_size: int | None = None,
) -> MegarmConfig:
    """Load and validate in one go, reporting key, type and layout problems together."""
    cfg, issues = _load(path, overrides)
    issues += validate(cfg, world_size)
    if issues:
        raise ConfigError(issues)
    return cfg


def _load(
    path: str | os.PathLike | None, overrides: list[str] | None
) -> tuple[MegarmConfig, list[ConfigIssue]]:
    cfg = MegarmConfig()
    issues: list[ConfigIssue] = []
    # Keys set explicitly -> where: the YAML's path, or COMMAND_LINE (which wins).
    explicit: dict[str, str] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError([ConfigIssue("--config", f"no such file: {path}")])
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError([ConfigIssue("--config", f"{path} is not valid YAML: {exc}")]) from exc
        if not isinstance(raw, dict):
            raise ConfigError([ConfigIssue("--config", f"{path} must hold a mapping of sections")])
        for section, body in raw.items():
            if body is None and section in SECTIONS:
                continue  # an empty section keeps its defaults
            if not isinstance(body, dict):
                if section in SECTIONS:
                    issues.append(ConfigIssue(section, "a section must be a mapping of keys"))
                else:
                    _apply(cfg, str(section), "", body, issues)
                continue
            for key, value in body.items():
                if _apply(cfg, str(section), str(key), value, issues):
                    explicit[f"{section}.{key}"] = str(path)
    for text in overrides or []:
        try:
            section, key, value = parse_override(text)
        except ConfigError as exc:
            issues.extend(exc.issues)
            continue
        if _apply(cfg, section, key, value, issues):
            explicit[f"{section}.{key}"] = COMMAND_LINE
    if cfg.model.hf_config:
        try:
            _fill_from_hf(cfg, explicit)
        except ConfigError as exc:
            issues.extend(exc.issues)
    _fill_from_family(cfg, explicit)
    return cfg, issues


def hf_config_path(hf_config: str) -> Path:
    """The config.json that ``model.hf_config`` names (a directory or the file)."""
    path = Path(hf_config)
    return path / "config.json" if path.is_dir() else path


def read_hf_config(hf_config: str) -> dict[str, Any]:
    """Read a HuggingFace config.json (plain JSON: no torch, no transformers)."""
    path = hf_config_path(hf_config)
    if not path.is_file():
        raise ConfigError(
            [ConfigIssue("model.hf_config", f"no config.json at {path}; point it at a HF model dir")]
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError([ConfigIssue("model.hf_config", f"{path} is not valid JSON: {exc}")]) from exc
    if not isinstance(data, dict):
        raise ConfigError([ConfigIssue("model.hf_config", f"{path} must hold a JSON object")])
    return data


COMMAND_LINE = "the command line"
HF_CONFIG = "model.hf_config"


def _note(message: str) -> None:
    """Tell the user something the run decided, once per job (rank 0 or no torchrun)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"megarm.config: {message}", file=sys.stderr, flush=True)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b


def _fill_from_hf(cfg: MegarmConfig, explicit: dict[str, str]) -> None:
    """The model's keys from ``model.hf_config``, through its family's table
    (:mod:`megarm.families`; a model megarm cannot represent is refused by name). A
    key the YAML also gives must agree with it (a silent mismatch once trained and
    exported a wrong ``rope_theta``); one given on the command line wins, and the
    run says so."""
    hf_path = hf_config_path(cfg.model.hf_config)  # type: ignore[arg-type]
    hf = read_hf_config(cfg.model.hf_config)  # type: ignore[arg-type]
    try:
        found = families.detect(hf, str(hf_path)).read(hf, str(hf_path))
    except families.FamilyError as exc:
        raise ConfigError([ConfigIssue("model.hf_config", str(exc))]) from exc
    issues: list[ConfigIssue] = []
    hints = _hints(ModelConfig)
    for ours, read in found.items():
        source = explicit.get(f"model.{ours}")
        # An explicit kv_channels: null means "derive it", which the HF value does.
        if source is None or (ours == "kv_channels" and cfg.model.kv_channels is None):
            if _apply(cfg, "model", ours, read.value, issues):
                explicit[f"model.{ours}"] = HF_CONFIG
            continue
        try:
            theirs = _coerce(read.value, hints[ours])
        except _BadValue:
            _apply(MegarmConfig(), "model", ours, read.value, issues)  # records the type issue
            continue
        mine = getattr(cfg.model, ours)
        if _same(mine, theirs):
            continue
        if source == COMMAND_LINE:
            _note(
                f"model.{ours}={mine!r} from the command line overrides {read.describe()} "
                f"of model.hf_config {hf_path}"
            )
        else:
            issues.append(ConfigIssue(
                f"model.{ours}",
                f"{source} sets {mine!r} but model.hf_config {hf_path} has {read.describe()}; "
                f"remove model.{ours} from {source} to take the checkpoint's value, or choose "
                f"one on the command line (model.{ours}=...)",
            ))
    if issues:
        raise ConfigError(issues)


def _fill_from_family(cfg: MegarmConfig, explicit: dict[str, str]) -> None:
    """The fields ``model.family`` fixes (QKV bias, QK-norm), where nothing set them;
    a value set against the family is named by :func:`validate`."""
    fixed = families.family(cfg.model.family).fixed
    for name, value in fixed.items():
        if f"model.{name}" not in explicit:
            setattr(cfg.model, name, value)


# --------------------------------------------------------------------------- validation


def reads_cu_seqlens(model: ModelConfig) -> bool:
    """Whether the model's attention takes packed sequences as one stream with
    ``cu_seqlens`` (transformer-engine, megarm's SDPA); megatron-core's unfused
    attention needs rows and a mask."""
    return model.attention_backend != "unfused"


def packed_format(cfg: MegarmConfig) -> Literal["rows", "thd"] | None:
    """How packed micro-batches are laid out (``None`` without ``data.packing``):
    ``thd`` (one stream + cu_seqlens) or ``rows`` (rows + dense block mask).
    ``auto`` picks ``thd`` whenever the attention reads cu_seqlens, ``rows``
    otherwise; :func:`validate` refuses an explicit ``thd`` it cannot read."""
    if not cfg.data.packing:
        return None
    if cfg.data.packed_format != "auto":
        return cfg.data.packed_format
    return "thd" if reads_cu_seqlens(cfg.model) else "rows"


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def layout_issues(m: ModelConfig, p: ParallelConfig) -> list[ConfigIssue]:
    """Why the TP/PP layout ``p`` cannot hold the model ``m`` (empty when it can), with
    the sizes that would work. The one place these rules live: :func:`validate` and
    the converters (their ``--target-*-parallel-size``) call it."""
    issues: list[ConfigIssue] = []

    def bad(key: str, message: str) -> None:
        issues.append(ConfigIssue(key, message))

    for key, value in [
        ("parallel.tensor_model_parallel_size", p.tensor_model_parallel_size),
        ("parallel.pipeline_model_parallel_size", p.pipeline_model_parallel_size),
    ]:
        if value < 1:
            bad(key, f"must be >= 1, got {value}")
    if issues:
        return issues
    tp, pp, vpp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size
    heads, groups = m.num_attention_heads, m.num_query_groups
    if heads % groups:
        bad("model.num_query_groups", f"{groups} KV heads must divide {heads} attention heads")
    if m.kv_channels is None and m.hidden_size % heads:
        bad("model.kv_channels", f"hidden_size {m.hidden_size} is not divisible by {heads} heads; set kv_channels")
    if heads % tp:
        bad(
            "parallel.tensor_model_parallel_size",
            f"TP={tp} must divide the {heads} attention heads; allowed: {_divisors(math.gcd(heads, groups))}",
        )
    if groups % tp:
        bad(
            "parallel.tensor_model_parallel_size",
            f"TP={tp} must divide the {groups} KV heads (query groups); each TP rank needs whole "
            f"groups. Allowed: {_divisors(math.gcd(heads, groups))}",
        )
    if m.ffn_hidden_size % tp:
        bad("parallel.tensor_model_parallel_size", f"TP={tp} must divide ffn_hidden_size {m.ffn_hidden_size}")
    if padded_vocab_size(m) % tp:
        bad(
            "model.make_vocab_size_divisible_by",
            f"padded vocabulary {padded_vocab_size(m)} is not divisible by TP={tp}; use a multiple of {tp}",
        )
    ep = p.expert_model_parallel_size
    if ep < 1:
        bad("parallel.expert_model_parallel_size", f"must be >= 1, got {ep}")
    elif ep > 1 and not m.num_moe_experts:
        bad("parallel.expert_model_parallel_size",
            f"EP={ep} needs a mixture-of-experts trunk (model.num_moe_experts); set it to 1")
    elif m.num_moe_experts and m.num_moe_experts % ep:
        bad("parallel.expert_model_parallel_size",
            f"EP={ep} must divide the {m.num_moe_experts} experts; allowed: {_divisors(m.num_moe_experts)}")
    if m.num_moe_experts and m.moe_ffn_hidden_size and m.moe_ffn_hidden_size % tp:
        bad("parallel.tensor_model_parallel_size",
            f"TP={tp} must divide moe_ffn_hidden_size {m.moe_ffn_hidden_size}")
    layers_per_chunk = pp * (vpp or 1)
    if m.num_layers % layers_per_chunk:
        what = f"PP={pp}" + (f" x virtual {vpp}" if vpp else "")
        bad(
            "parallel.pipeline_model_parallel_size",
            f"{what} must divide the {m.num_layers} layers; allowed PP: {_divisors(m.num_layers)}",
        )
    return issues


def family_issues(m: ModelConfig) -> list[ConfigIssue]:
    """Fields ``model.family`` cannot express (its HF config has no place for them),
    and RoPE scaling parameters that make no frequencies."""
    issues = [ConfigIssue(key, message) for key, message in families.family(m.family).model_problems(m)]
    if m.use_rope_scaling:
        if m.rope_scaling_factor < 1:
            issues.append(ConfigIssue("model.rope_scaling_factor", f"must be >= 1, got {m.rope_scaling_factor}"))
        if not 0 < m.rope_low_freq_factor < m.rope_high_freq_factor:
            issues.append(ConfigIssue(
                "model.rope_high_freq_factor",
                f"needs 0 < rope_low_freq_factor < rope_high_freq_factor, got "
                f"{m.rope_low_freq_factor} and {m.rope_high_freq_factor}",
            ))
        if m.rope_original_max_positions < 1:
            issues.append(ConfigIssue(
                "model.rope_original_max_positions", f"must be >= 1, got {m.rope_original_max_positions}"
            ))
    return issues


def validate(cfg: MegarmConfig, world_size: int | None = None) -> list[ConfigIssue]:
    """Every cross-field problem of ``cfg`` (empty when it is sound).

    ``world_size`` is the number of ranks the run will have; layout checks that
    need it are skipped when it is ``None``.
    """
    m, p, d, t, o, c = cfg.model, cfg.parallel, cfg.data, cfg.training, cfg.optimizer, cfg.checkpoint
    issues: list[ConfigIssue] = []

    def bad(key: str, message: str) -> None:
        issues.append(ConfigIssue(key, message))

    for key, value in [
        ("model.num_layers", m.num_layers),
        ("model.hidden_size", m.hidden_size),
        ("model.ffn_hidden_size", m.ffn_hidden_size),
        ("model.num_attention_heads", m.num_attention_heads),
        ("model.num_query_groups", m.num_query_groups),
        ("model.vocab_size", m.vocab_size),
        ("model.make_vocab_size_divisible_by", m.make_vocab_size_divisible_by),
        ("parallel.tensor_model_parallel_size", p.tensor_model_parallel_size),
        ("parallel.pipeline_model_parallel_size", p.pipeline_model_parallel_size),
        ("data.seq_length", d.seq_length),
        ("training.micro_batch_size", t.micro_batch_size),
        ("training.global_batch_size", t.global_batch_size),
        ("training.train_iters", t.train_iters),
        ("training.log_interval", t.log_interval),
    ]:
        if value < 1:
            bad(key, f"must be >= 1, got {value}")
    if issues:
        return issues

    tp, pp, vpp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size
    issues.extend(layout_issues(m, p))
    issues.extend(family_issues(m))
    if d.packing and d.packed_format == "thd" and not reads_cu_seqlens(m):
        bad(
            "data.packed_format",
            "thd needs an attention that reads cu_seqlens (transformer-engine or sdpa); "
            "megatron-core's unfused attention does not: set model.attention_backend=auto or "
            "data.packed_format=rows",
        )
    if vpp is not None and (vpp < 1 or pp < 2):
        bad("parallel.virtual_pipeline_model_parallel_size", "needs pipeline_model_parallel_size >= 2 and a value >= 1")
    if p.sequence_parallel and tp < 2:
        bad("parallel.sequence_parallel", "needs tensor_model_parallel_size > 1; set it false or raise TP")
    if p.expert_model_parallel_size > 1 and tp > 1 and not p.sequence_parallel:
        bad("parallel.sequence_parallel",
            "expert parallelism with tensor parallelism needs sequence_parallel=true "
            "(megatron-core's MoE token dispatch); set it true, or TP or EP to 1")

    dp = None
    if world_size is not None:
        if world_size % (tp * pp):
            bad(
                "parallel",
                f"world size {world_size} is not divisible by TP x PP = {tp} x {pp} = {tp * pp}; "
                f"launch a multiple of {tp * pp} ranks",
            )
        else:
            dp = world_size // (tp * pp)
        ep = p.expert_model_parallel_size
        if ep > 1 and world_size % (tp * ep * pp):
            bad(
                "parallel.expert_model_parallel_size",
                f"world size {world_size} is not divisible by TP x EP x PP = {tp} x {ep} x {pp}; "
                f"launch a multiple of {tp * ep * pp} ranks or lower EP",
            )
    if dp is not None and t.global_batch_size % (t.micro_batch_size * dp):
        bad(
            "training.global_batch_size",
            f"{t.global_batch_size} is not divisible by micro_batch_size x data-parallel size = "
            f"{t.micro_batch_size} x {dp}; use a multiple of {t.micro_batch_size * dp}",
        )
    if d.seq_length > m.max_position_embeddings:
        bad(
            "data.seq_length",
            f"{d.seq_length} exceeds the model's max_position_embeddings {m.max_position_embeddings}",
        )

    # NaN compares false with everything, so it would slip past the range checks below.
    for section, cls in SECTIONS.items():
        for key in _hints(cls):
            value = getattr(getattr(cfg, section), key)
            if isinstance(value, float) and not math.isfinite(value):
                bad(f"{section}.{key}", f"must be a finite number, got {value}")
    for key, value in [("lr", o.lr), ("min_lr", o.min_lr), ("weight_decay", o.weight_decay)]:
        if value < 0:
            bad(f"optimizer.{key}", f"must be >= 0, got {value}")
    if o.adam_eps <= 0:
        bad("optimizer.adam_eps", f"must be > 0, got {o.adam_eps}")
    for key, value in [("adam_beta1", o.adam_beta1), ("adam_beta2", o.adam_beta2)]:
        if not 0 <= value < 1:
            bad(f"optimizer.{key}", f"must be within [0, 1), got {value}")
    if not 0 <= o.lr_warmup_fraction <= 1:
        bad("optimizer.lr_warmup_fraction", f"must be within [0, 1], got {o.lr_warmup_fraction}")
    if 0 <= o.lr < o.min_lr:
        bad("optimizer.min_lr", f"{o.min_lr} is above lr {o.lr}")
    if o.clip_grad < 0:
        bad("optimizer.clip_grad", "must be >= 0 (0 disables clipping)")
    for key, value in [("model.attention_dropout", m.attention_dropout), ("model.hidden_dropout", m.hidden_dropout)]:
        if not 0 <= value < 1:
            bad(key, f"must be within [0, 1), got {value}")
    if m.recompute_num_layers < 1:
        bad("model.recompute_num_layers", "must be >= 1")
    elif m.recompute_granularity == "full" and m.recompute_method == "uniform":
        per_stage = m.num_layers // max(pp * (vpp or 1), 1)
        if per_stage % m.recompute_num_layers:
            bad(
                "model.recompute_num_layers",
                f"{m.recompute_num_layers} must divide the {per_stage} layers of a pipeline "
                "stage with recompute_method uniform",
            )
    if t.objective == "joint":
        for key, value in [("lm_loss_weight", t.lm_loss_weight), ("rm_loss_weight", t.rm_loss_weight)]:
            if value < 0:
                bad(f"training.{key}", f"must be >= 0, got {value}")
        if t.lm_loss_weight <= 0 and t.rm_loss_weight <= 0:
            bad(
                "training.lm_loss_weight",
                "joint needs a positive lm_loss_weight or rm_loss_weight (both are 0); use "
                "objective rm or sft for one loss alone",
            )
    if m.params_dtype == "fp16":
        bad(
            "model.params_dtype",
            "fp16 is not supported (it needs dynamic loss scaling, which megarm does not "
            "run); use bf16 (fp32 main weights, same speed on Ampere and later GPUs) or fp32",
        )

    for key, value in [
        ("data.tokenizer_name_or_path", d.tokenizer_name_or_path),
        ("checkpoint.load", c.load),
    ]:
        if value and not Path(value).exists():
            bad(key, f"path does not exist: {value}")
    if t.eval_benchmark:
        if not Path(t.eval_benchmark).is_file():
            bad("training.eval_benchmark", f"no such file: {t.eval_benchmark}")
        if not d.tokenizer_name_or_path:
            bad("training.eval_benchmark", "needs data.tokenizer_name_or_path to encode its records")
        if t.objective == "sft":
            bad("training.eval_benchmark", "scores rewards: objective sft has no value head")
    if c.load and Path(c.load).exists():
        try:  # file names only: a garbled tracker or an empty directory is named now
            resolve_checkpoint(c.load, c.ckpt_step)
        except CheckpointNotFoundError as exc:
            bad("checkpoint.ckpt_step" if c.ckpt_step is not None else "checkpoint.load", str(exc))
    if d.data_path:
        issues.extend(_validate_data_path(d, m))
        issues.extend(_objective_data_problems(d, t))
    issues.extend(_start_problems(cfg))
    issues.extend(_wandb_problems(cfg.logging))
    try:
        weights = [float(x) for x in d.split.replace("/", ",").split(",")]
        if len(weights) != 3 or min(weights) < 0 or sum(weights) <= 0 or weights[0] <= 0:
            raise ValueError
    except ValueError:
        bad("data.split", f"expected three non-negative weights like '98,2,0', got {d.split!r}")
    if c.save_interval is not None and c.save_interval < 1:
        bad("checkpoint.save_interval", "must be >= 1 (or null)")
    if c.save_interval and not c.save:
        bad("checkpoint.save", "save_interval is set but save (the directory) is not")
    if c.keep_last is not None and c.keep_last < 1:
        bad("checkpoint.keep_last", "must be >= 1 (or null to keep all)")
    return issues


# From this size on a model is "real": synthetic pairs and random weights are then a
# mistake unless asked for (every shipped Qwen2.5 config is above, tiny/demo far below).
REAL_MODEL_PARAMETERS = 100_000_000


def approx_parameters(model: ModelConfig) -> int:
    """Embedding plus matmul weights of the trunk and value head (norms and biases,
    a fraction of a percent, left out)."""
    d, h = head_dim(model), model.hidden_size
    attention = h * (2 * model.num_attention_heads + 2 * model.num_query_groups) * d
    return padded_vocab_size(model) * h + model.num_layers * (attention + 3 * h * model.ffn_hidden_size) + h


def _start_problems(cfg: MegarmConfig) -> list[ConfigIssue]:
    """A real-size model must name its data and its starting weights."""
    size = approx_parameters(cfg.model)
    if size < REAL_MODEL_PARAMETERS:
        return []
    what = f"this {size / 1e9:.2f}B-parameter model"
    issues = []
    if not cfg.data.data_path and not cfg.data.allow_synthetic:
        issues.append(ConfigIssue(
            "data.data_path",
            f"null would train {what} on generated synthetic pairs; set it to the "
            "--output-prefix of tools/preprocess_data.py (or data.allow_synthetic=true "
            "for a benchmark or smoke test)",
        ))
    if not cfg.checkpoint.load and not cfg.checkpoint.allow_random_init:
        issues.append(ConfigIssue(
            "checkpoint.load",
            f"null would start {what} from random weights; set it to a checkpoint "
            "converted with ckpt_convert/hf2mcore.py or saved by a run (or "
            "checkpoint.allow_random_init=true for a benchmark or smoke test)",
        ))
    return issues


def _wandb_problems(log: LoggingConfig) -> list[ConfigIssue]:
    """W&B is optional: asked for, it must be installed (checked without importing it)."""
    if not log.wandb_project:
        stray = [k for k in ("wandb_entity", "wandb_name", "wandb_dir", "wandb_mode")
                 if getattr(log, k) is not None]
        return [ConfigIssue(f"logging.{k}", "has no effect without logging.wandb_project")
                for k in stray]
    if importlib.util.find_spec("wandb") is None:
        return [ConfigIssue(
            "logging.wandb_project",
            "W&B logging needs the wandb package: pip install 'megarm[wandb]' (or pip "
            "install wandb), or set logging.wandb_project=null",
        )]
    return []


def _validate_data_path(d: DataConfig, m: ModelConfig) -> list[ConfigIssue]:
    """Check every prefix of ``data_path`` has its packed files, that they agree with
    each other and stats.json, fit data.seq_length and the model's vocabulary
    (:mod:`megarm.data.integrity`: the .idx files and sizes only, numpy)."""
    # Imported here, only with a data path: megarm.data (numpy) takes 0.12-0.14 s,
    # more than this whole module's 0.08-0.10 s (python -X importtime, this machine).
    from megarm.data.blend import parse_data_path, prefix_problems
    from megarm.data.integrity import prefix_issues

    try:
        blend = parse_data_path(d.data_path)  # type: ignore[arg-type]
    except ValueError as exc:
        return [ConfigIssue("data.data_path", str(exc))]
    issues = [ConfigIssue("data.data_path", msg) for _, prefix in blend for msg in prefix_problems(prefix)]
    if not issues:
        for _, prefix in blend:
            found = prefix_issues(prefix, d.seq_length, m.vocab_size, m.max_position_embeddings)
            issues += [ConfigIssue(key, msg) for key, msg in found]
    return issues


def _objective_data_problems(d: DataConfig, t: TrainingConfig) -> list[ConfigIssue]:
    """SFT records train ``objective: sft`` only; preference pairs ``rm`` or ``joint``."""
    from megarm.data.blend import data_kind, parse_data_path

    try:
        kinds = {prefix: data_kind(prefix) for _, prefix in parse_data_path(d.data_path)}  # type: ignore[arg-type]
    except ValueError:
        return []  # named by _validate_data_path
    wanted = "sft" if t.objective == "sft" else "pairs"
    for prefix, kind in kinds.items():
        if kind is not None and kind != wanted:
            fix = (
                "preprocess SFT records with --handler-name sft"
                if wanted == "sft"
                else "preprocess preference pairs (e.g. --handler-name critique_pairs)"
            )
            return [ConfigIssue(
                "training.objective",
                f"{t.objective} trains on {'SFT records' if wanted == 'sft' else 'preference pairs'}"
                f" but {prefix} holds {'SFT records' if kind == 'sft' else 'preference pairs'}; "
                f"set training.objective={'sft' if kind == 'sft' else 'rm or joint'} or {fix}",
            )]
    return []


def check(cfg: MegarmConfig, world_size: int | None = None) -> MegarmConfig:
    """Raise :class:`ConfigError` with every problem, or return ``cfg``."""
    issues = validate(cfg, world_size)
    if issues:
        raise ConfigError(issues)
    return cfg


def to_dict(cfg: MegarmConfig) -> dict[str, Any]:
    """Plain nested dict of the config (YAML/JSON friendly)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: MegarmConfig) -> str:
    """The resolved config as YAML, loadable by :func:`load_config`."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def from_dict(data: dict[str, Any]) -> MegarmConfig:
    """Inverse of :func:`to_dict` (with the same checks as YAML loading)."""
    overrides = [
        f"{section}.{key}={json.dumps(value)}"
        for section, body in data.items()
        for key, value in (body or {}).items()
    ]
    return load_config(None, overrides)


def markdown_reference() -> str:
    """The config reference in Markdown (``docs/config.md``), from the docstrings."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from the docstrings in `megarm/config.py` by "
        "`python -m megarm.config --markdown`. Set keys in YAML sections or override them "
        "on the command line as `section.key=value`.",
        "",
    ]
    top = field_docs(MegarmConfig)
    for section, cls in SECTIONS.items():
        lines += [f"## `{section}`", "", top.get(section, ""), ""]
        lines += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        docs = field_docs(cls)
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        for key, tp in _hints(cls).items():
            doc = " ".join(docs.get(key, "").split()).replace("|", "\\|")
            default = json.dumps(defaults[key])
            kind = describe_type(tp).replace("|", "\\|")
            lines.append(f"| `{key}` | {kind} | `{default}` | {doc} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m megarm.config``: print the resolved config or every error."""
    parser = argparse.ArgumentParser(
        prog="python -m megarm.config",
        description="Resolve and validate a megarm config without starting anything.",
    )
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--world-size", type=int, default=None, help="number of ranks the run will have")
    parser.add_argument("--markdown", action="store_true", help="print the config reference instead")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown_reference())
        return 0
    try:
        cfg = resolve(args.config, args.overrides, args.world_size)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(to_yaml(cfg), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
