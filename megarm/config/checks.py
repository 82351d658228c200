"""The config's cross-field checks, by section, without touching the file system:
the TP/PP layout against the model, the launch size against the batch, ranges and
finiteness of numbers, the objective's weights, the save schedule. Each problem
names its key and the fix. :mod:`megarm.preflight` adds the checks of the files a
run names (checkpoints, data, tokenizers).
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable
from typing import Literal

from megarm import families
from megarm.config.loading import Settings, _load
from megarm.config.schema import (
    SECTIONS,
    ConfigError,
    ConfigIssue,
    LoggingConfig,
    MegarmConfig,
    ModelConfig,
    ParallelConfig,
    _hints,
)
from megarm.families.base import head_dim, padded_vocab_size


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
    """Every cross-field problem of ``cfg`` (empty when it is sound), without
    touching the file system (:mod:`megarm.preflight` checks the files a run names).

    ``world_size`` is the number of ranks the run will have; layout checks that
    need it are skipped when it is ``None``.
    """
    issues = _size_issues(cfg)
    # Rules that divide by a count (layout, world size, the parameter estimate) wait
    # for the counts to be positive; every other rule runs anyway, so one run lists
    # every bad value (a zero batch size once hid lr, beta1, clip_grad and keep_last).
    sized = not issues
    if sized:
        issues.extend(layout_issues(cfg.model, cfg.parallel))
        issues.extend(family_issues(cfg.model))
        issues.extend(_parallel_issues(cfg))
        issues.extend(_world_issues(cfg, world_size))
    for section_issues in (_number_issues, _model_issues, _objective_issues):
        issues.extend(section_issues(cfg))
    if sized:
        issues.extend(_start_problems(cfg))
    issues.extend(_wandb_problems(cfg.logging))
    issues.extend(_data_and_checkpoint_issues(cfg))
    return issues


def _size_issues(cfg: MegarmConfig) -> list[ConfigIssue]:
    """Counts that must be positive before any other rule can be applied."""
    m, p, d, t = cfg.model, cfg.parallel, cfg.data, cfg.training
    return [
        ConfigIssue(key, f"must be >= 1, got {value}")
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
            ("parallel.context_parallel_size", p.context_parallel_size),
            ("data.seq_length", d.seq_length),
            ("training.micro_batch_size", t.micro_batch_size),
            ("training.global_batch_size", t.global_batch_size),
            ("training.train_iters", t.train_iters),
            ("training.log_interval", t.log_interval),
        ]
        if value < 1
    ]


def _parallel_issues(cfg: MegarmConfig) -> list[ConfigIssue]:
    """Packing format, virtual pipeline and sequence parallelism against the layout."""
    m, p, d = cfg.model, cfg.parallel, cfg.data
    issues = []
    if d.packing and d.packed_format == "thd" and not reads_cu_seqlens(m):
        issues.append(ConfigIssue(
            "data.packed_format",
            "thd needs an attention that reads cu_seqlens (transformer-engine or sdpa); "
            "megatron-core's unfused attention does not: set model.attention_backend=auto or "
            "data.packed_format=rows",
        ))
    vpp = p.virtual_pipeline_model_parallel_size
    if vpp is not None and (vpp < 1 or p.pipeline_model_parallel_size < 2):
        issues.append(ConfigIssue(
            "parallel.virtual_pipeline_model_parallel_size",
            "needs pipeline_model_parallel_size >= 2 and a value >= 1",
        ))
    if p.sequence_parallel and p.tensor_model_parallel_size < 2:
        issues.append(ConfigIssue(
            "parallel.sequence_parallel",
            "needs tensor_model_parallel_size > 1; set it false or raise TP",
        ))
    if p.expert_model_parallel_size > 1 and p.tensor_model_parallel_size > 1 and not p.sequence_parallel:
        issues.append(ConfigIssue(
            "parallel.sequence_parallel",
            "expert parallelism with tensor parallelism needs sequence_parallel=true "
            "(megatron-core's MoE token dispatch); set it true, or TP or EP to 1",
        ))
    issues.extend(_context_issues(cfg))
    if d.seq_length > m.max_position_embeddings:
        issues.append(ConfigIssue(
            "data.seq_length",
            f"{d.seq_length} exceeds the model's max_position_embeddings {m.max_position_embeddings}",
        ))
    return issues


def _context_issues(cfg: MegarmConfig) -> list[ConfigIssue]:
    """Context parallelism against the sequence length, attention and trunk."""
    m, p, d = cfg.model, cfg.parallel, cfg.data
    cp = p.context_parallel_size
    if cp == 1:
        return []
    issues = []
    unit = 2 * cp * (p.tensor_model_parallel_size if p.sequence_parallel else 1)
    if d.seq_length % unit:
        what = "2 x CP x TP (sequence parallelism)" if p.sequence_parallel else "2 x CP"
        issues.append(ConfigIssue(
            "data.seq_length",
            f"{d.seq_length} is not a multiple of {what} = {unit}; context parallelism cuts "
            f"every sequence into 2 x CP chunks: use {-(-d.seq_length // unit) * unit}",
        ))
    if m.attention_backend == "unfused":
        issues.append(ConfigIssue(
            "model.attention_backend",
            "megatron-core's unfused attention has no context parallelism; set "
            "model.attention_backend=auto (transformer-engine, else megarm's SDPA)",
        ))
    if cfg.training.reward_offsets:
        issues.append(ConfigIssue(
            "training.reward_offsets",
            "is not verified with context parallelism yet; set it to [] or "
            "parallel.context_parallel_size to 1",
        ))
    if cfg.training.objective in ("listwise", "regression", "prm"):
        issues.append(ConfigIssue(
            "parallel.context_parallel_size",
            f"context parallelism with training.objective={cfg.training.objective} is not "
            "verified against CP=1 yet; set it to 1 (rm, sft and joint support it)",
        ))
    if m.num_moe_experts:
        issues.append(ConfigIssue(
            "parallel.context_parallel_size",
            "context parallelism with a mixture-of-experts trunk is not supported yet; "
            "set it to 1 (use expert and tensor parallelism for MoE trunks)",
        ))
    return issues


def _world_issues(cfg: MegarmConfig, world_size: int | None) -> list[ConfigIssue]:
    """The launch's rank count against TP x PP and the batch sizes."""
    if world_size is None:
        return []
    if world_size < 1:
        return [ConfigIssue("--world-size", f"must be >= 1, got {world_size}")]
    p, t = cfg.parallel, cfg.training
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    if world_size % (tp * pp * cp):
        if cp == 1:
            return [ConfigIssue(
                "parallel",
                f"world size {world_size} is not divisible by TP x PP = {tp} x {pp} = {tp * pp}; "
                f"launch a multiple of {tp * pp} ranks",
            )]
        return [ConfigIssue(
            "parallel.context_parallel_size",
            f"world size {world_size} is not divisible by TP x CP x PP = {tp} x {cp} x {pp} = "
            f"{tp * cp * pp}; launch a multiple of {tp * cp * pp} ranks or change CP",
        )]
    dp = world_size // (tp * pp * cp)
    ep = p.expert_model_parallel_size
    if ep > 1 and world_size % (tp * ep * pp):
        return [ConfigIssue(
            "parallel.expert_model_parallel_size",
            f"world size {world_size} is not divisible by TP x EP x PP = {tp} x {ep} x {pp}; "
            f"launch a multiple of {tp * ep * pp} ranks or lower EP",
        )]
    if t.global_batch_size % (t.micro_batch_size * dp):
        return [ConfigIssue(
            "training.global_batch_size",
            f"{t.global_batch_size} is not divisible by micro_batch_size x data-parallel size = "
            f"{t.micro_batch_size} x {dp}; use a multiple of {t.micro_batch_size * dp}",
        )]
    return []


def _number_issues(cfg: MegarmConfig) -> list[ConfigIssue]:
    """Finite floats, and the optimizer's and dropouts' ranges."""
    o, m = cfg.optimizer, cfg.model
    issues = []

    def bad(key: str, message: str) -> None:
        issues.append(ConfigIssue(key, message))

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
    return issues


def _model_issues(cfg: MegarmConfig) -> list[ConfigIssue]:
    """Recomputation against the pipeline stages, and the supported dtypes."""
    m, p = cfg.model, cfg.parallel
    issues = []
    if m.recompute_num_layers < 1:
        issues.append(ConfigIssue("model.recompute_num_layers", "must be >= 1"))
    elif m.recompute_granularity == "full" and m.recompute_method == "uniform":
        stages = p.pipeline_model_parallel_size * (p.virtual_pipeline_model_parallel_size or 1)
        per_stage = m.num_layers // max(stages, 1)
        if per_stage % m.recompute_num_layers:
            issues.append(ConfigIssue(
                "model.recompute_num_layers",
                f"{m.recompute_num_layers} must divide the {per_stage} layers of a pipeline "
                "stage with recompute_method uniform",
            ))
    if m.params_dtype == "fp16":
        issues.append(ConfigIssue(
            "model.params_dtype",
            "fp16 is not supported (it needs dynamic loss scaling, which megarm does not "
            "run); use bf16 (fp32 main weights, same speed on Ampere and later GPUs) or fp32",
        ))
    return issues


def _objective_issues(cfg: MegarmConfig) -> list[ConfigIssue]:
    """The centring coefficient, list-wise synthetic data, the joint objective's loss
    weights."""
    t = cfg.training
    issues = []
    if any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in t.reward_offsets):
        issues.append(ConfigIssue(
            "training.reward_offsets",
            f"must be whole numbers >= 1 (tokens before the trained reward token), got "
            f"{t.reward_offsets}; e.g. [1] for ChatML's <|im_end|>, or [] to turn it off",
        ))
    if t.reward_offsets and t.objective not in ("rm", "joint"):
        issues.append(ConfigIssue(
            "training.reward_offsets",
            f"supervises pairwise rewards (objective rm or joint), not training.objective="
            f"{t.objective}; set it to []",
        ))
    if t.reward_consistency_coefficient < 0:
        issues.append(ConfigIssue(
            "training.reward_consistency_coefficient",
            f"must be >= 0, got {t.reward_consistency_coefficient}; use 0 to turn it off",
        ))
    if t.center_rewards_coefficient < 0:  # (NaN: _number_issues)
        issues.append(ConfigIssue(
            "training.center_rewards_coefficient",
            f"must be >= 0, got {t.center_rewards_coefficient}; use 0 to turn it off or e.g. 0.01",
        ))
    if t.objective == "listwise" and cfg.data.synthetic_num_responses < 2:
        issues.append(ConfigIssue(
            "data.synthetic_num_responses",
            f"must be >= 2 (a ranking needs two responses), got "
            f"{cfg.data.synthetic_num_responses}",
        ))
    issues += _label_issues(cfg)
    if t.objective == "prm":
        issues += _prm_issues(cfg)
    if t.objective != "joint":
        return issues
    issues += [
        ConfigIssue(f"training.{key}", f"must be >= 0, got {value}")
        for key, value in [("lm_loss_weight", t.lm_loss_weight), ("rm_loss_weight", t.rm_loss_weight)]
        if value < 0
    ]
    if t.lm_loss_weight <= 0 and t.rm_loss_weight <= 0:
        issues.append(ConfigIssue(
            "training.lm_loss_weight",
            "joint needs a positive lm_loss_weight or rm_loss_weight (both are 0); use "
            "objective rm or sft for one loss alone",
        ))
    return issues


def label_names(cfg: MegarmConfig) -> list[str]:
    """``model.label_names`` as a list (``label_0, ...`` when unset)."""
    names = cfg.model.label_names
    if names:
        return [name.strip() for name in names.split(",")]
    return [f"label_{i}" for i in range(cfg.model.num_labels)]


def label_weights(cfg: MegarmConfig) -> list[float]:
    """``training.label_weights`` as a list of floats (all 1 when unset)."""
    weights = cfg.training.label_weights
    if not weights:
        return [1.0] * cfg.model.num_labels
    return [float(w) for w in weights.split(",")]


def _prm_issues(cfg: MegarmConfig) -> list[ConfigIssue]:
    """``objective: prm``: the combinations not verified against one process yet are
    refused (context parallelism is refused with the other CP checks)."""
    m, t = cfg.model, cfg.training
    issues = []
    if m.num_moe_experts:
        issues.append(ConfigIssue(
            "model.num_moe_experts",
            "training.objective=prm is not verified with a mixture-of-experts trunk yet; "
            "use a dense trunk (unset model.num_moe_experts)",
        ))
    if t.eval_benchmark:
        issues.append(ConfigIssue(
            "training.eval_benchmark",
            "scores pairs with one reward each; training.objective=prm has no step-level "
            "benchmark evaluation yet: remove it",
        ))
    if t.center_rewards_coefficient:
        issues.append(ConfigIssue(
            "training.center_rewards_coefficient",
            "centres pairwise rewards; training.objective=prm has per-step labels: set it to 0",
        ))
    return issues


def _label_issues(cfg: MegarmConfig) -> list[ConfigIssue]:
    """``model.num_labels`` / ``label_names`` and ``training.label_weights``."""
    m, t = cfg.model, cfg.training
    issues = []
    if m.num_labels < 1:
        return [ConfigIssue("model.num_labels", f"must be >= 1, got {m.num_labels}")]
    if m.num_labels > 1 and t.objective != "regression":
        issues.append(ConfigIssue(
            "model.num_labels",
            f"{m.num_labels} outputs need training.objective=regression (objective "
            f"{t.objective} trains one reward); set model.num_labels=1",
        ))
    names = label_names(cfg)
    if len(names) != m.num_labels or len(set(names)) != len(names) or not all(names):
        issues.append(ConfigIssue(
            "model.label_names",
            f"{m.label_names!r} must name model.num_labels={m.num_labels} distinct "
            "attributes, comma-separated (e.g. helpfulness,correctness)",
        ))
    if t.label_weights is not None:
        try:
            weights = label_weights(cfg)
            if len(weights) != m.num_labels or not all(math.isfinite(w) and w >= 0 for w in weights) \
                    or sum(weights) <= 0:
                raise ValueError
        except ValueError:
            issues.append(ConfigIssue(
                "training.label_weights",
                f"{t.label_weights!r} must be model.num_labels={m.num_labels} non-negative "
                "numbers with a positive sum, comma-separated (e.g. 1,1,0.5)",
            ))
        if t.objective != "regression":
            issues.append(ConfigIssue(
                "training.label_weights", "is for training.objective=regression; remove it"))
    return issues


def _data_and_checkpoint_issues(cfg: MegarmConfig) -> list[ConfigIssue]:
    """The split weights, benchmark evaluation's needs, and the save schedule."""
    d, t, c = cfg.data, cfg.training, cfg.checkpoint
    issues = []

    def bad(key: str, message: str) -> None:
        issues.append(ConfigIssue(key, message))

    if t.eval_benchmark:
        if not d.tokenizer_name_or_path:
            bad("training.eval_benchmark", "needs data.tokenizer_name_or_path to encode its records")
        if t.objective == "sft":
            bad("training.eval_benchmark", "scores rewards: objective sft has no value head")
    try:
        weights = [float(x) for x in d.split.replace("/", ",").split(",")]
        if len(weights) != 3 or min(weights) < 0 or sum(weights) <= 0 or weights[0] <= 0:
            raise ValueError
    except ValueError:
        bad("data.split", f"expected three non-negative weights like '98,2,0', got {d.split!r}")
    if t.eval_iters < 0:
        bad("training.eval_iters", f"must be >= 0, got {t.eval_iters}")
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


def check(
    cfg: MegarmConfig,
    world_size: int | None = None,
    checks: Callable[[MegarmConfig, int | None], list[ConfigIssue]] = validate,
) -> MegarmConfig:
    """Raise :class:`ConfigError` with every problem ``checks`` finds, or return ``cfg``."""
    issues = checks(cfg, world_size)
    if issues:
        raise ConfigError(issues)
    return cfg


def resolve(
    path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    world_size: int | None = None,
    settings: Settings | None = None,
    checks: Callable[[MegarmConfig, int | None], list[ConfigIssue]] = validate,
) -> MegarmConfig:
    """Load and validate in one go, reporting key, type and layout problems together
    (``checks``: these; :func:`megarm.preflight.resolve` adds the file checks)."""
    cfg, issues = _load(path, overrides, settings)
    issues += checks(cfg, world_size)
    if issues:
        raise ConfigError(issues)
    return cfg
