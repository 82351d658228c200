"""Memory estimate of a megarm run per GPU (per process on CPU), torch-free, from
the config alone.

Model states per rank, for the pipeline stage that holds the most:

* weights: parameters x bytes of ``params_dtype``;
* gradients: megarm's DDP keeps them in fp32 (4 bytes per parameter);
* optimizer: Adam's two fp32 moments, plus an fp32 main copy when the weights
  are bf16/fp16 (12 or 8 bytes per parameter), divided by the data-parallel size
  with the distributed optimizer. bf16 therefore costs 18 bytes per parameter,
  or 6 + 12/d with the distributed optimizer.

Activations are sized per micro-batch from its tokens. Padded, that is ``s b`` (2 x
pairs rows of ``data.seq_length``, the longest a row can be). A THD-packed
micro-batch is one stream of its sides' real lengths (:func:`stream_tokens`): with
the dataset's length statistics (``<prefix>_stats.json``, written by
tools/preprocess_data.py) the estimate uses pairs x the sum of the sides' 90th
percentile lengths (above the mean, which a sum of many sides stays near), else the
cap ``2 x pairs x seq_length``.

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation
in Large Transformer Models") per layer, with s the sequence length, b the rows
of a micro-batch (2 x pairs: chosen and rejected go through together), h the
hidden size, a the heads and t the TP size, in bytes for 16-bit activations:
no recompute ``s b h (10 + 24/t + 5 a s /(h t))``, sequence parallel
``s b h (34 + 5 a s / h) / t``; with selective recompute (or a fused attention
that never materialises the score matrix: SDPA, TE) the ``5 a s / h`` term
drops; with full recompute a layer keeps only its input, ``2 s b h`` (``/t``
with sequence parallel). Under 1F1B the first stage holds PP micro-batches in
flight, i.e. all L layers' worth; fp32 activations double everything.

Peaks (measured with tools/benchmark_save_memory.py; docs/BENCHMARKS.md):

* the optimizer step needs temporaries beyond the model states: none worth
  counting with a fused Adam (transformer-engine's or apex's, which megatron-core
  uses when either is installed); without them megatron-core steps with torch's
  AdamW: on CUDA its foreach implementation, whose ``_foreach_sqrt(exp_avg_sq)``
  makes one fp32 temporary per updated parameter (:data:`GPU_FOREACH_TRANSIENTS`,
  4 bytes per parameter, not measured yet); on CPU, measured at 2.2-2.5x the fp32
  bytes of the parameters (:data:`CPU_STEP_TRANSIENTS`); with torch's fused AdamW on CPU
  (what megarm selects there) an iteration still peaks 1.6-1.7x the fp32 parameter
  bytes above the model states (:data:`CPU_FUSED_STEP_TRANSIENTS`, measured at 108M
  parameters). Activations are freed by then, so a step peaks at
  ``model states + max(activations, step temporaries)``;
* a checkpoint save (:mod:`megarm.checkpoint.writer`) writes one tensor at a time:
  it holds at most two host copies of the largest tensor (its fp32 optimizer
  state), and no extra device memory. On CPU the process keeps part of the heap an
  iteration grew to (glibc does not hand every freed block back): measured at
  1.1-1.8x the fp32 parameter bytes on top of the model states when a save starts
  (:data:`CPU_RETAINED_HEAP`), plus the one serialised copy of the tensor being written;
* a CPU process also holds its libraries (:data:`CPU_RUNTIME_BYTES`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from megarm.config import MegarmConfig, packed_format
from megarm.families.base import head_dim, padded_vocab_size

GIB = 2**30
# Python, torch, megatron-core and transformers in one training process (CPU, measured).
CPU_RUNTIME_BYTES = int(0.4 * GIB)
# torch's AdamW on CPU: step temporaries per fp32 byte of the parameters (measured
# 2.2-2.5 at 108M and 0.5B parameters; the upper value is used).
CPU_STEP_TRANSIENTS = 2.5
# The same with torch's fused AdamW on CPU (megarm's choice there, platform.torch_fused_adam):
# 1.63x on a fresh-clone CI run and 1.68x here at 108M parameters; the upper value is used.
CPU_FUSED_STEP_TRANSIENTS = 1.7
# torch's foreach AdamW on CUDA (megatron-core's optimizer without TE/apex): the
# sqrt(exp_avg_sq) list, one fp32 tensor per updated parameter, lives through the step.
GPU_FOREACH_TRANSIENTS = 1.0
# The length quantile of each side that sizes a packed stream (see the module docstring).
PACKED_LENGTH_QUANTILE = "p90"
# CPU: heap still held when a save starts, per fp32 byte of the parameters (measured
# 1.1 at 108M and 1.8 at 0.5B parameters per rank; the middle is used).
CPU_RETAINED_HEAP = 1.5


@dataclass
class MemoryEstimate:
    """Bytes per GPU (per process on CPU) for the most loaded pipeline stage."""

    parameters: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    step_transients: int = 0
    """Optimizer-step temporaries (0 with a fused Adam)."""
    stream_tokens: int = 0
    """Tokens of one micro-batch the activations are sized for (:func:`stream_tokens`)."""
    largest_tensor: int = 0
    """fp32 bytes of the rank's largest parameter (its optimizer state): a save holds
    two host copies of it at most."""
    runtime: int = 0
    """Libraries of the process (counted on CPU, where all memory is host memory)."""
    retained_heap: int = 0
    """CPU: heap the process still holds from an iteration when a save starts."""
    on_gpu: bool = True

    @property
    def model_states(self) -> int:
        """Weights + gradients + optimizer state."""
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        """Model states and activations (no allocator fragmentation, no workspace)."""
        return self.model_states + self.activations

    @property
    def training_peak(self) -> int:
        """Peak of an iteration: activations live in the backward, step temporaries
        in the optimizer step, never both."""
        return self.runtime + self.model_states + max(self.activations, self.step_transients)

    @property
    def save_extra_host(self) -> int:
        """Host memory a checkpoint save adds: two copies of the largest tensor."""
        return 2 * self.largest_tensor

    @property
    def save_peak(self) -> int:
        """Peak while saving: on GPU the device's (a save adds nothing there; its host
        copies are :attr:`save_extra_host`); on CPU the process's: model states, the
        heap retained from the iteration and the serialised tensor being written."""
        if self.on_gpu:
            return self.model_states
        return self.runtime + self.model_states + self.retained_heap + self.largest_tensor

    @property
    def peak(self) -> int:
        """The run's estimated peak (training or saving)."""
        return max(self.training_peak, self.save_peak)

    def summary(self) -> str:
        """One line for the start of a training run."""
        g = GIB
        where = "GPU" if self.on_gpu else "process"
        line = (
            f"memory estimate per {where}: {self.parameters / 1e6:,.1f}M params | weights "
            f"{self.weights / g:.2f} GiB | grads {self.gradients / g:.2f} GiB | optimizer "
            f"{self.optimizer / g:.2f} GiB | activations {self.activations / g:.2f} GiB | "
        )
        if self.on_gpu:
            return line + (
                f"peak {self.training_peak / g:.2f} GiB; a checkpoint save adds "
                f"{self.save_extra_host / g:.2f} GiB of host memory and none on the GPU"
            )
        return line + (
            f"peak {self.training_peak / g:.2f} GiB training, {self.save_peak / g:.2f} GiB "
            "saving a checkpoint"
        )

    def to_dict(self) -> dict[str, int]:
        """Plain dict with the derived totals."""
        return {
            **asdict(self), "model_states": self.model_states, "total": self.total,
            "training_peak": self.training_peak, "save_peak": self.save_peak,
            "save_extra_host": self.save_extra_host, "peak": self.peak,
        }


def stage_expert_parameters(cfg: MegarmConfig, pp_rank: int) -> int:
    """Of :func:`stage_parameters`, the routed experts' (this EP rank's experts, split
    by TP as the dense MLP): the parameters megatron-core's distributed optimizer
    shards over the expert-data-parallel ranks, not the data-parallel ones."""
    m, p = cfg.model, cfg.parallel
    if not m.num_moe_experts:
        return 0
    local = m.num_moe_experts // p.expert_model_parallel_size
    per_layer = local * 3 * m.hidden_size * (m.moe_ffn_hidden_size or 0) // p.tensor_model_parallel_size
    return m.num_layers // p.pipeline_model_parallel_size * per_layer


def stage_parameters(cfg: MegarmConfig, pp_rank: int) -> int:
    """Parameters held by one TP rank of pipeline stage ``pp_rank``."""
    m, p = cfg.model, cfg.parallel
    t = p.tensor_model_parallel_size
    h, d = m.hidden_size, head_dim(m)
    qkv_out = (m.num_attention_heads + 2 * m.num_query_groups) * d
    mlp = 3 * h * m.ffn_hidden_size // t
    if m.num_moe_experts:
        # The routed experts are counted below (stage_expert_parameters); here the
        # replicated router and the shared expert with its gate.
        shared = m.moe_shared_expert_intermediate_size or 0
        mlp = h * m.num_moe_experts + 3 * h * shared // t + (h if shared else 0)
    per_layer = (
        qkv_out * h // t
        + (qkv_out // t if m.add_qkv_bias else 0)
        + h * m.num_attention_heads * d // t
        + mlp
        + 2 * h  # the two RMSNorm weights, replicated over TP
    )
    if m.qk_layernorm:
        per_layer += 2 * d
    count = m.num_layers // p.pipeline_model_parallel_size * per_layer + stage_expert_parameters(cfg, pp_rank)
    last = pp_rank == p.pipeline_model_parallel_size - 1
    if pp_rank == 0:
        count += padded_vocab_size(m) * h // t
    if last:
        count += h  # final norm
        if cfg.training.objective != "sft":
            count += h * m.num_labels  # value head
        # The output layer of sft/joint: its own weight, or (tied) a copy of the
        # embedding on the last stage when that is not also the first.
        if cfg.training.objective in ("sft", "joint") and (not m.tie_word_embeddings or pp_rank > 0):
            count += padded_vocab_size(m) * h // t
    return count


def rows_per_record(cfg: MegarmConfig) -> int:
    """Sequences one record puts through the model: 1 for ``sft`` and
    ``regression``, 2 for a pair
    (``rm``, ``joint``), K for a ranked record (``listwise``: the most responses of
    any record, from the data's stats.json ``responses_per_record``; without data
    ``data.synthetic_num_responses``)."""
    objective = cfg.training.objective
    if objective in ("sft", "regression", "prm"):
        return 1
    if objective != "listwise":
        return 2
    if not cfg.data.data_path:
        return cfg.data.synthetic_num_responses
    from megarm.data.blend import parse_data_path
    from megarm.data.integrity import read_stats

    most = 0
    for _, prefix in parse_data_path(cfg.data.data_path):
        counts = (read_stats(prefix) or {}).get("responses_per_record") or {}
        most = max(most, int(counts.get("max", 0)))
    return most or cfg.data.synthetic_num_responses


# sft/joint: the share of a micro-batch's tokens that are supervised (the LM head runs
# on those only). A target of half the sequence is typical of SFT and critique data.
SUPERVISED_FRACTION = 0.5


def lm_logits_bytes(cfg: MegarmConfig, micro_batch_size: int | None = None) -> int:
    """The LM head's fp32 logits, their softmax and gradient at the supervised
    positions of one micro-batch (0 for a pure reward model)."""
    if cfg.training.objective not in ("sft", "joint"):
        return 0
    rows = rows_per_record(cfg) * (micro_batch_size or cfg.training.micro_batch_size)
    # Under context parallelism each rank holds 1/CP of the supervised positions.
    tokens = SUPERVISED_FRACTION * rows * cfg.data.seq_length / cfg.parallel.context_parallel_size
    return int(3 * 4 * tokens * padded_vocab_size(cfg.model) / cfg.parallel.tensor_model_parallel_size)


def _dtype_bytes(cfg: MegarmConfig, cuda: bool) -> int:
    name = cfg.model.params_dtype
    if name == "auto":
        name = "bf16" if cuda else "fp32"
    return 4 if name == "fp32" else 2


def data_side_lengths(cfg: MegarmConfig) -> dict[str, dict[str, float]] | None:
    """Per-side length statistics of the training data (``lengths`` of each
    ``<prefix>_stats.json`` of ``data.data_path``; the longest of a blend's), or
    ``None`` without data or statistics."""
    if not cfg.data.data_path:
        return None
    from megarm.data.blend import parse_data_path
    from megarm.data.integrity import read_stats

    merged: dict[str, dict[str, float]] = {}
    for _, prefix in parse_data_path(cfg.data.data_path):
        stats = read_stats(prefix)
        lengths = (stats or {}).get("lengths")
        if not isinstance(lengths, dict) or not lengths:
            return None  # one component without statistics: no bound from the data
        for side, q in lengths.items():
            if isinstance(q, dict) and PACKED_LENGTH_QUANTILE in q:
                old = merged.get(side, {}).get(PACKED_LENGTH_QUANTILE, 0.0)
                merged[side] = {PACKED_LENGTH_QUANTILE: max(old, float(q[PACKED_LENGTH_QUANTILE]))}
    return merged or None


def stream_tokens(
    cfg: MegarmConfig,
    micro_batch_size: int | None = None,
    side_lengths: Mapping[str, Mapping[str, Any]] | None = None,
) -> int:
    """Tokens of one micro-batch (one rank, before TP/SP splitting) for sizing
    activations: ``rows x data.seq_length`` padded or without length statistics; a
    THD-packed stream with ``side_lengths`` (:func:`data_side_lengths`): pairs x the
    sum over sides of each side's 90th-percentile length (each capped at
    ``seq_length``), rounded up to the TP size under sequence parallelism."""
    b = micro_batch_size or cfg.training.micro_batch_size
    rows = rows_per_record(cfg)
    cap = rows * b * cfg.data.seq_length
    if packed_format(cfg) != "thd" or not side_lengths:
        return cap
    # A ranked record's one side ("responses") holds K sequences.
    per_record = sum(min(float(cfg.data.seq_length), float(q[PACKED_LENGTH_QUANTILE]))
                     * (rows if side == "responses" else 1)
                     for side, q in side_lengths.items() if PACKED_LENGTH_QUANTILE in q)
    if per_record <= 0:
        return cap
    p = cfg.parallel
    multiple = p.tensor_model_parallel_size if p.sequence_parallel else 1
    return min(cap, math.ceil(math.ceil(b * per_record) / multiple) * multiple)


def activation_bytes(
    cfg: MegarmConfig,
    cuda: bool = True,
    micro_batch_size: int | None = None,
    world_size: int | None = None,
    side_lengths: Mapping[str, Mapping[str, Any]] | None = None,
) -> int:
    """Activation bytes of the first pipeline stage for micro-batches of
    :func:`stream_tokens` tokens (``rows x data.seq_length`` when padded).

    Context parallelism gives each rank ``1/CP`` of the tokens, plus what its
    attention exchanges: megarm's SDPA path all-gathers every layer's K and V and
    keeps the gathered copies for the backward (``2 x tokens x KV heads / TP x head
    dim`` per layer); transformer-engine's p2p ring holds about as much in flight,
    so the same term is counted for both."""
    m, p = cfg.model, cfg.parallel
    cp = p.context_parallel_size
    s, h, a = cfg.data.seq_length // cp, m.hidden_size, m.num_attention_heads
    t = p.tensor_model_parallel_size
    full_tokens = stream_tokens(cfg, micro_batch_size, side_lengths)
    tokens = full_tokens / cp  # "s b" of the formulas, this CP rank's share
    fused_attention = m.attention_backend != "unfused"
    score_term = 0.0 if (m.recompute_granularity == "selective" or fused_attention) else 5 * a * s / h
    if m.recompute_granularity == "full":
        per_layer = 2 * tokens * h / (t if p.sequence_parallel else 1)
    elif p.sequence_parallel:
        per_layer = tokens * h * (34 + score_term) / t
    else:
        per_layer = tokens * h * (10 + 24 / t + score_term / t)
    scale = 2 if _dtype_bytes(cfg, cuda) == 4 else 1
    if cp > 1 and m.recompute_granularity != "full":
        kv_heads = max(1, m.num_query_groups // t)
        # K and V of the whole sequence, 2 bytes per element as the formulas count
        per_layer += 2 * 2 * full_tokens * kv_heads * head_dim(m)
    # 1F1B: the first stage keeps PP micro-batches of L/PP layers = L layers.
    in_flight = min(p.pipeline_model_parallel_size, _num_microbatches(cfg, world_size))
    layers = m.num_layers // p.pipeline_model_parallel_size * in_flight
    return int(per_layer * layers * scale)


def _num_microbatches(cfg: MegarmConfig, world_size: int | None = None) -> int:
    p = cfg.parallel
    model_ranks = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
    dp = (world_size or model_ranks) // model_ranks
    return max(1, cfg.training.global_batch_size // (cfg.training.micro_batch_size * max(dp, 1)))


def largest_parameter(cfg: MegarmConfig, pp_rank: int) -> int:
    """Elements of the largest parameter one TP rank of stage ``pp_rank`` holds."""
    m, p = cfg.model, cfg.parallel
    t, h = p.tensor_model_parallel_size, m.hidden_size
    qkv = (m.num_attention_heads + 2 * m.num_query_groups) * head_dim(m) * h // t
    biggest = max(qkv, 2 * m.ffn_hidden_size * h // t, h * m.num_attention_heads * head_dim(m) // t)
    if pp_rank == 0:
        biggest = max(biggest, padded_vocab_size(m) * h // t)
    return biggest


def estimate(
    cfg: MegarmConfig,
    world_size: int,
    cuda: bool = True,
    pp_rank: int | None = None,
    fused_adam: bool = True,
    side_lengths: Mapping[str, Mapping[str, Any]] | None = None,
) -> MemoryEstimate:
    """Per-GPU (per-process on CPU) estimate for pipeline stage ``pp_rank`` (default:
    the most loaded). ``fused_adam`` (default; ``platform.has_fused_adam()``): a
    fused Adam steps the parameters, transformer-engine's, apex's or, without them,
    torch's fused kernel that megarm selects on CUDA and CPU; on a GPU it needs no
    step temporaries, on CPU the measured ones are counted. False: torch's
    unfused AdamW (a torch without the fused kernel for the device).
    ``side_lengths`` (default: :func:`data_side_lengths` of the config's data) sizes
    packed streams."""
    p = cfg.parallel
    cp = p.context_parallel_size
    dp = max(1, world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size * cp))
    stages = range(p.pipeline_model_parallel_size) if pp_rank is None else [pp_rank]
    params = max(stage_parameters(cfg, r) for r in stages)
    width = _dtype_bytes(cfg, cuda)
    optim_per_param = 8 + (4 if width < 4 else 0)  # moments (+ fp32 main weights)
    optimizer = params * optim_per_param
    stepped = params  # parameters this rank's optimizer updates
    if p.use_distributed_optimizer:
        # Sharded over the data x context parallel ranks; a mixture of experts' routed
        # experts over the expert-data-parallel ranks (world / (TP x EP x PP)).
        experts = max(stage_expert_parameters(cfg, r) for r in stages)
        expert_dp = max(1, world_size // (p.tensor_model_parallel_size * p.expert_model_parallel_size
                                          * p.pipeline_model_parallel_size))
        stepped = -(-(params - experts) // (dp * cp)) + -(-experts // expert_dp)
        optimizer = stepped * optim_per_param
    if side_lengths is None and packed_format(cfg) == "thd":
        side_lengths = data_side_lengths(cfg)
    if cuda:
        per_byte = 0.0 if fused_adam else GPU_FOREACH_TRANSIENTS
    else:
        per_byte = CPU_FUSED_STEP_TRANSIENTS if fused_adam else CPU_STEP_TRANSIENTS
    return MemoryEstimate(
        parameters=params,
        weights=params * width,
        gradients=params * 4,
        optimizer=optimizer,
        activations=activation_bytes(cfg, cuda, world_size=world_size, side_lengths=side_lengths)
        + lm_logits_bytes(cfg),
        step_transients=int(per_byte * 4 * stepped),
        stream_tokens=stream_tokens(cfg, side_lengths=side_lengths),
        largest_tensor=4 * max(largest_parameter(cfg, r) for r in stages),
        runtime=0 if cuda else CPU_RUNTIME_BYTES,
        retained_heap=0 if cuda else int(CPU_RETAINED_HEAP * 4 * params),
        on_gpu=cuda,
    )


def largest_micro_batch(cfg: MegarmConfig, world_size: int, gpu_gib: float, cuda: bool = True,
                        fused_adam: bool = True) -> int:
    """Largest micro-batch (pairs) whose estimate fits ``gpu_gib`` (0: none fits)."""
    base = estimate(cfg, world_size, cuda, fused_adam=fused_adam)
    budget = gpu_gib * GIB - base.model_states
    sides = data_side_lengths(cfg) if packed_format(cfg) == "thd" else None
    per_pair = activation_bytes(cfg, cuda, micro_batch_size=1, world_size=world_size,
                                side_lengths=sides)
    per_pair += lm_logits_bytes(cfg, micro_batch_size=1)
    return max(0, int(budget // per_pair)) if per_pair else 0
