"""The config's schema: the dataclass tree, one section per dataclass, a docstring
on every field (``docs/config.md`` is generated from them), and the error types.

Names follow Megatron-LM where one exists. No torch, no file system.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import types
import typing
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal


@dataclass
class ModelConfig:
    """Shape and numerics of the GPT trunk (any family in :mod:`megarm.families`:
    Qwen2/Qwen2.5, Qwen3, Llama 3)."""

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

    moe_z_loss_coeff: float | None = None
    """Coefficient of the router z-loss (ST-MoE: the mean over tokens of
    ``logsumexp(router logits)^2``, megatron-core's ``moe_z_loss_coeff``), which keeps
    the router's logits small; added to the reward loss in training and logged as
    ``moe_z_loss``. ``null``: off (HF's Qwen-MoE models have none; 1e-3 is ST-MoE's)."""

    tie_word_embeddings: bool = False
    """Whether the HF model ties its LM head to the embedding. A pure reward model
    (``training.objective: rm``) has no LM head and only exports it in the HF config;
    with ``sft`` or ``joint`` the output layer is the input embedding when this is
    true (a copy kept in step on the last pipeline stage, as in megatron-core's
    GPTModel), else a weight of its own."""

    init_method_std: float = 0.02
    """Std of the normal init for a randomly initialised trunk."""

    num_labels: int = 1
    """Outputs of the value head: 1 for a reward model; ``training.objective:
    regression`` regresses one per attribute (HelpSteer2: 5). Exported as
    ``*ForSequenceClassification`` with this ``num_labels``."""

    label_names: str | None = None
    """The attributes of a ``num_labels``-output head, comma-separated in output
    order (e.g. ``helpfulness,correctness,coherence,complexity,verbosity``): the
    metrics' names, the export's ``id2label`` and the keys ``megarm.score`` returns.
    ``null``: ``label_0, label_1, ...`` (regression data must then agree with its
    stats.json ``label_names`` in count only)."""

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

    context_parallel_size: int = 1
    """Context-parallel size CP: every sequence is split over CP ranks (each holds
    ``2`` of its ``2 * CP`` chunks, megatron-core's load-balanced causal split), so a
    pair too long for one device's activations fits; the numbers equal CP=1. The
    world is TP x CP x PP x DP ranks; ``data.seq_length`` must be a multiple of
    ``2 * CP`` (x TP with sequence parallelism). Raise CP for length, TP for model
    size (docs/long_inputs.md)."""

    cp_comm_type: Literal["p2p", "all_gather", "a2a", "a2a+p2p"] = "p2p"
    """How transformer-engine's attention exchanges K/V under CP: ``p2p`` (a ring,
    overlapping the transfers with compute; the default), ``all_gather``, ``a2a``
    (all-to-all over heads, Ulysses-style: needs heads divisible by TP x CP) or
    ``a2a+p2p`` (hierarchical). Without transformer-engine megarm's SDPA attention
    all-gathers K and V (one collective per layer) whatever this says."""

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
    """Number of generated pairs when ``data_path`` is null (ranked records with
    ``training.objective: listwise``)."""

    synthetic_num_responses: int = 4
    """Responses per generated ranked record (``training.objective: listwise`` with
    ``data_path`` null); at least 2."""

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
    rejected go through one forward); records for ``sft`` and ``listwise`` (a ranked
    record's K responses are K rows of one micro-batch)."""

    global_batch_size: int = 8
    """Pairs (records) per optimizer step over all data-parallel ranks and
    accumulation steps."""

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

    objective: Literal["rm", "sft", "joint", "listwise", "regression", "prm"] = "rm"
    """What the model learns. ``rm``: a reward model, the Bradley-Terry loss on
    preference pairs (the value head only; no vocabulary-sized output layer is
    built). ``sft``: supervised fine-tuning, the next-token cross-entropy on the
    supervised (label) tokens of SFT records (the output layer only), e.g. CLoud's
    stage 1 on critiques. ``joint``: both heads on preference pairs,
    ``rm_loss_weight * BT + lm_loss_weight * LM`` with the LM loss over each side's
    supervised tokens (a critique, or a generated reason), as CLoud's stage 3 and
    WorldPM-style training. The LM loss is the mean over the supervised tokens of
    the whole global batch. ``listwise``: a reward model on ranked records (K scored
    responses per prompt, ``--handler-name ranked`` or ``ultrafeedback_ranked``), the
    Plackett-Luce loss over each record's score order (ties by Breslow's rule; K=2 is
    Bradley-Terry); the batch sizes count records, each response runs once.
    ``regression``: a ``model.num_labels``-output value head regressed on per-response
    attribute labels (``--handler-name regression`` or ``helpsteer2``), the masked
    mean squared error over the global batch's labelled entries (missing labels
    add nothing), weighted per attribute by ``label_weights``. ``prm``: a process
    reward model on step-labelled solutions (``--handler-name prm_steps`` or
    ``math_shepherd``), the value head read at every step-end marker, ``prm_loss``
    per step averaged over every step of the global batch."""

    prm_loss: Literal["bce", "mse"] = "bce"
    """``objective: prm``: the per-step loss. ``bce``: binary cross-entropy of
    ``sigmoid(value)`` against the step's label (hard labels, or soft ones in [0, 1]);
    ``mse``: ``(sigmoid(value) - label)^2`` (soft labels such as Math-Shepherd's
    completion rates)."""

    lm_loss_weight: float = 0.3
    """Weight of the LM (cross-entropy) loss in ``objective: joint``."""

    rm_loss_weight: float = 0.7
    """Weight of the pairwise (Bradley-Terry) loss in ``objective: joint``."""

    listwise_loss: Literal["plackett_luce", "all_pairs"] = "plackett_luce"
    """``objective: listwise``: ``plackett_luce`` (the likelihood of the records'
    score order, Breslow ties) or ``all_pairs`` (each record's mean Bradley-Terry loss
    over its score-distinct pairs, every response still run once). Both are
    Bradley-Terry for K=2."""

    label_weights: str | None = None
    """``objective: regression``: per-attribute loss weights, comma-separated in
    ``model.label_names`` order (e.g. ``1,1,1,0.5,0.5``); ``null``: all 1. The loss
    is ``sum_a w_a SSE_a / sum_a w_a N_a``."""

    reward_offsets: list[int] = field(default_factory=list)
    """Also supervise the reward this many tokens before the trained one, each with
    its own Bradley-Terry loss (the loss is their mean; metrics are the trained
    position's). ``[1]`` for ChatML: megarm reads the reward at the end of
    ``apply_chat_template``'s output (``<|im_end|>\\n``), OpenRLHF and PPO/GRPO loops at
    the generated ``<|im_end|>``, one token before. ``[]``: off (Llama 3 needs none:
    its sequences end at ``<|eot_id|>``). Each must be >= 1."""

    reward_consistency_coefficient: float = 0.0
    """With ``reward_offsets``: adds ``coef * mean((r_k - r)^2)`` over the extra
    positions ``k``, pulling the reward read there onto the trained one (the
    Bradley-Terry loss at each position orders them alike but leaves their values
    apart). 0: off. Must be >= 0."""

    center_rewards_coefficient: float = 0.0
    """Adds ``coef * mean((r_chosen + r_rejected)^2)`` to the pairwise loss (TRL's
    ``center_rewards_coefficient``, e.g. 0.01): pulls each pair's rewards towards a
    zero mean, so scores stay centred without a post-hoc shift. Logged as
    ``center_loss`` (``bt_loss`` the Bradley-Terry part). 0: off. Must be >= 0."""


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


def markdown_reference() -> str:
    """The config reference in Markdown (``docs/config.md``), from the docstrings."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from the docstrings in `megarm/config/schema.py` by "
        "`python -m megarm.config --markdown`. Set keys in YAML sections or override them "
        "on the command line as `section.key=value`.",
        "",
    ]
    top = field_docs(MegarmConfig)
    for section, cls in SECTIONS.items():
        lines += [f"## `{section}`", "", top.get(section, ""), ""]
        lines += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        docs = field_docs(cls)
        defaults = {f.name: f.default if f.default_factory is dataclasses.MISSING
                    else f.default_factory() for f in dataclasses.fields(cls)}
        for key, tp in _hints(cls).items():
            doc = " ".join(docs.get(key, "").split()).replace("|", "\\|")
            default = json.dumps(defaults[key])
            kind = describe_type(tp).replace("|", "\\|")
            lines.append(f"| `{key}` | {kind} | `{default}` | {doc} |")
        lines.append("")
    return "\n".join(lines)
