"""Per-GPU memory estimate of a megarm run (torch-free, from the config alone).

Model states per rank, for the pipeline stage that holds the most:

* weights: parameters x bytes of ``params_dtype``;
* gradients: megarm's DDP keeps them in fp32 (4 bytes per parameter);
* optimizer: Adam's two fp32 moments, plus an fp32 main copy when the weights
  are bf16/fp16 (12 or 8 bytes per parameter), divided by the data-parallel size
  with the distributed optimizer. bf16 therefore costs 18 bytes per parameter,
  or 6 + 12/d with the distributed optimizer (ARCHITECTURE.md).

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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from megarm.config import MegarmConfig, head_dim, padded_vocab_size

GIB = 2**30


@dataclass
class MemoryEstimate:
    """Bytes per GPU (for the most loaded pipeline stage)."""

    parameters: int
    weights: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def model_states(self) -> int:
        """Weights + gradients + optimizer state."""
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        """Everything estimated (no allocator fragmentation, no workspace)."""
        return self.model_states + self.activations

    def summary(self) -> str:
        """One line for the start of a training run."""
        g = GIB
        return (
            f"memory estimate per GPU: {self.parameters / 1e6:,.1f}M params | weights "
            f"{self.weights / g:.2f} GiB | grads {self.gradients / g:.2f} GiB | optimizer "
            f"{self.optimizer / g:.2f} GiB | activations {self.activations / g:.2f} GiB | "
            f"total {self.total / g:.2f} GiB"
        )

    def to_dict(self) -> dict[str, int]:
        """Plain dict with the derived totals."""
        return {**asdict(self), "model_states": self.model_states, "total": self.total}


def stage_parameters(cfg: MegarmConfig, pp_rank: int) -> int:
    """Parameters held by one TP rank of pipeline stage ``pp_rank``."""
    m, p = cfg.model, cfg.parallel
    t = p.tensor_model_parallel_size
    h, d = m.hidden_size, head_dim(m)
    qkv_out = (m.num_attention_heads + 2 * m.num_query_groups) * d
    per_layer = (
        qkv_out * h // t
        + (qkv_out // t if m.add_qkv_bias else 0)
        + h * m.num_attention_heads * d // t
        + 3 * h * m.ffn_hidden_size // t
        + 2 * h  # the two RMSNorm weights, replicated over TP
    )
    count = m.num_layers // p.pipeline_model_parallel_size * per_layer
    if pp_rank == 0:
        count += padded_vocab_size(m) * h // t
    if pp_rank == p.pipeline_model_parallel_size - 1:
        count += 2 * h  # final norm + value head
    return count


def _dtype_bytes(cfg: MegarmConfig, cuda: bool) -> int:
    name = cfg.model.params_dtype
    if name == "auto":
        name = "bf16" if cuda else "fp32"
    return 4 if name == "fp32" else 2


def activation_bytes(
    cfg: MegarmConfig,
    cuda: bool = True,
    micro_batch_size: int | None = None,
    world_size: int | None = None,
) -> int:
    """Activation bytes of the first pipeline stage at ``data.seq_length``."""
    m, p = cfg.model, cfg.parallel
    s, h, a = cfg.data.seq_length, m.hidden_size, m.num_attention_heads
    t = p.tensor_model_parallel_size
    b = 2 * (micro_batch_size or cfg.training.micro_batch_size)
    fused_attention = m.attention_backend != "unfused"
    score_term = 0.0 if (m.recompute_granularity == "selective" or fused_attention) else 5 * a * s / h
    if m.recompute_granularity == "full":
        per_layer = 2 * s * b * h / (t if p.sequence_parallel else 1)
    elif p.sequence_parallel:
        per_layer = s * b * h * (34 + score_term) / t
    else:
        per_layer = s * b * h * (10 + 24 / t + score_term / t)
    scale = 2 if _dtype_bytes(cfg, cuda) == 4 else 1
    # 1F1B: the first stage keeps PP micro-batches of L/PP layers = L layers.
    in_flight = min(p.pipeline_model_parallel_size, _num_microbatches(cfg, world_size))
    layers = m.num_layers // p.pipeline_model_parallel_size * in_flight
    return int(per_layer * layers * scale)


def _num_microbatches(cfg: MegarmConfig, world_size: int | None = None) -> int:
    p = cfg.parallel
    dp = (world_size or p.tensor_model_parallel_size * p.pipeline_model_parallel_size) // (
        p.tensor_model_parallel_size * p.pipeline_model_parallel_size
    )
    return max(1, cfg.training.global_batch_size // (cfg.training.micro_batch_size * max(dp, 1)))


def estimate(
    cfg: MegarmConfig, world_size: int, cuda: bool = True, pp_rank: int | None = None
) -> MemoryEstimate:
    """Per-GPU estimate for pipeline stage ``pp_rank`` (default: the most loaded)."""
    p = cfg.parallel
    dp = max(1, world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size))
    stages = range(p.pipeline_model_parallel_size) if pp_rank is None else [pp_rank]
    params = max(stage_parameters(cfg, r) for r in stages)
    width = _dtype_bytes(cfg, cuda)
    optim_per_param = 8 + (4 if width < 4 else 0)  # moments (+ fp32 main weights)
    optimizer = params * optim_per_param
    if p.use_distributed_optimizer:
        optimizer = -(-optimizer // dp)
    return MemoryEstimate(
        parameters=params,
        weights=params * width,
        gradients=params * 4,
        optimizer=optimizer,
        activations=activation_bytes(cfg, cuda, world_size=world_size),
    )


def largest_micro_batch(cfg: MegarmConfig, world_size: int, gpu_gib: float, cuda: bool = True) -> int:
    """Largest micro-batch (pairs) whose estimate fits ``gpu_gib`` (0: none fits)."""
    base = estimate(cfg, world_size, cuda)
    budget = gpu_gib * GIB - base.model_states
    per_pair = activation_bytes(cfg, cuda, micro_batch_size=1, world_size=world_size)
    return max(0, int(budget // per_pair)) if per_pair else 0
