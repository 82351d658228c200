"""One micro-batch through the model under megatron-core's pipeline schedules.

:class:`PairBatch` is the micro-batch every path builds (training's collate step,
scoring's batch planner); :func:`run_schedule` runs megatron-core's schedule over a
list of them, with backward for training and forward only for every inference path,
given the loss to take at the last stage (training's :mod:`megarm.training.loss`, or
:func:`reward_outputs` to read rewards only).

A micro-batch holds ``b`` preference pairs as ``2b`` rows: chosen rows first, then
rejected rows, so both go through the model in one forward (or, for SFT records and
scoring, one row per sequence).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_model_config
from torch import Tensor

from megarm.model.attention import PackedSegments
from megarm.model.context_split import split_batch

LossFn = Callable[["PairBatch", object], tuple[Tensor, dict[str, Tensor]]]
"""``loss(batch, output) -> (loss, outputs)``: what the schedule takes at the last stage."""


@dataclass
class PairBatch:
    """One micro-batch of ``b`` pairs as ``2b`` rows (chosen first, then rejected)."""

    tokens: Tensor
    """``[2b, s]`` token ids, padded."""
    position_ids: Tensor
    """``[2b, s]`` positions (restarting at 0 for every packed sequence)."""
    reward_index: Tensor
    """``[2b]`` index of each sequence's reward token (its last token) in its row."""
    margin: Tensor
    """``[b]`` Bradley-Terry margin per pair (zeros when the data has none)."""
    labels: Tensor | None = None
    """``[2b, s]`` response labels (-100 over prompt and padding), kept for an
    auxiliary LM loss."""
    attention_mask: Tensor | None = None
    """``[rows, 1, s, s]`` bool, True where attention is blocked; ``None`` = causal."""
    reward_row: Tensor | None = None
    """``[2b]`` row holding each sequence's reward token when sequences are packed
    (``data.packing``; then ``reward_index`` is the position within that row and
    ``tokens`` has ``rows <= 2b`` rows); ``None``: sequence ``i`` is row ``i``."""
    cu_seqlens: Tensor | None = None
    """``[n + 1]`` int32 segment boundaries of a THD-packed micro-batch (one row
    holding every sequence end to end); ``None`` for the other layouts."""
    max_seqlen: int | None = None
    """Longest segment of a THD-packed micro-batch."""
    seq_lengths: tuple[int, ...] | None = None
    """Host copy of the THD segment lengths (``diff(cu_seqlens)``), so attention
    splits the stream without reading ``cu_seqlens`` back from the device."""
    max_position: int | None = None
    """Largest position id when positions restart per packed sequence (packed
    rows); ``None``: every row is ``arange(s)``. A host int, so the model picks its
    RoPE path without a device sync."""
    lm_index: Tensor | None = None
    """``[m]`` positions whose next token is supervised (label not -100, in the same
    sequence), as flat indices ``position * rows + row`` into the model's ``[s,
    rows]`` layout; ``None`` when no LM loss is taken."""
    lm_target: Tensor | None = None
    """``[m]`` the supervised token each ``lm_index`` position must predict."""
    lm_tokens: int = 0
    """``m``, on the host (from the collate step)."""
    lm_scale: float = 0.0
    """Turns this micro-batch's cross-entropy sum into its share of the global
    batch's token mean (set by the training loop; see the module docstring)."""
    lengths: Tensor | None = None
    """``[n]`` real tokens of each sequence, kept when the batch is cut for context
    parallelism (this rank's positions no longer hold every reward token)."""
    context_rank: int = 0
    """The context-parallel rank this batch was cut for (:mod:`megarm.model.context_split`)."""
    context_size: int = 1
    """CP ranks the batch was cut over (1: not cut). ``reward_index`` is then -1
    for sequences whose reward token another CP rank holds."""
    scores: Tensor | None = None
    """``[n, K]`` scores of ``n`` ranked records (``training.objective: listwise``;
    higher is better). The rows are the records' responses one record after another,
    the row-major order of the ``valid`` slots; ``margin`` is then empty."""
    valid: Tensor | None = None
    """``[n, K]`` bool: which of a record's ``K`` slots hold a response (records with
    fewer responses than the micro-batch's most are padded)."""
    targets: Tensor | None = None
    """``[n, num_labels]`` attribute labels of ``n`` regression records (one row each;
    ``training.objective: regression``), 0 where missing."""
    target_mask: Tensor | None = None
    """``[n, num_labels]`` bool: which labels the records have."""
    target_scale: float = 0.0
    """Turns this micro-batch's weighted squared-error sum into its share of the
    global batch's weighted mean (set by the training loop, like ``lm_scale``)."""
    step_targets: Tensor | None = None
    """``[k]`` labels of the ``k`` steps of step-labelled records (``training.objective:
    prm``; 1.0 a good step). ``reward_index`` / ``reward_row`` then hold one entry per
    *step* (its step-end marker), not per sequence, and ``lengths`` the sequences'
    real lengths."""
    step_sequence: Tensor | None = None
    """``[k]`` which sequence of the micro-batch each step belongs to (steps of one
    sequence are consecutive, in order)."""
    step_scale: float = 0.0
    """Turns this micro-batch's per-step loss sum into its share of the global
    batch's mean over steps (set by the training loop, like ``lm_scale``)."""

    def packed_seq_params(self) -> PackedSegments | None:
        """megatron-core's THD description of this micro-batch, or ``None``."""
        if self.cu_seqlens is None:
            return None
        # Cut for CP, cu_seqlens are the padded global boundaries: megatron-core's
        # RoPE and transformer-engine read them as cu_seqlens_*_padded.
        padded = self.cu_seqlens if self.context_size > 1 else None
        return PackedSegments(
            qkv_format="thd",
            cu_seqlens_q=self.cu_seqlens,
            cu_seqlens_kv=self.cu_seqlens,
            cu_seqlens_q_padded=padded,
            cu_seqlens_kv_padded=padded,
            max_seqlen_q=self.max_seqlen,
            max_seqlen_kv=self.max_seqlen,
            seq_lengths=self.seq_lengths,
        )

    def sequence_lengths(self) -> Tensor:
        """``[n]`` real tokens of each sequence: ``lengths`` when the batch was cut for
        CP, else the position of its reward token + 1 (positions restart per packed
        sequence, so this holds packed or not)."""
        if self.lengths is not None:
            return self.lengths
        rows = self.reward_row
        if rows is None:
            rows = torch.arange(self.reward_index.shape[0], device=self.reward_index.device)
        return self.position_ids[rows, self.reward_index] + 1

    @property
    def num_pairs(self) -> int:
        """Pairs in this micro-batch (0 for SFT records)."""
        return self.margin.shape[0]

    @property
    def num_records(self) -> int:
        """Ranked records in this micro-batch (0 unless list-wise)."""
        return 0 if self.scores is None else self.scores.shape[0]

    @property
    def num_sequences(self) -> int:
        """Sequences in this micro-batch (each has a reward index, the last token;
        step-labelled records: one per sequence in ``lengths``)."""
        if self.step_targets is not None:
            return self.lengths.shape[0]  # type: ignore[union-attr]
        return self.reward_index.shape[0]

    @property
    def num_steps(self) -> int:
        """Steps in this micro-batch (0 unless ``training.objective: prm``)."""
        return 0 if self.step_targets is None else self.step_targets.shape[0]

    def to(self, device: torch.device) -> PairBatch:
        """Move every tensor to ``device`` (asynchronously from pinned memory)."""
        moved = {
            f.name: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v)
            for f in fields(self)
            for v in [getattr(self, f.name)]
        }
        return PairBatch(**moved)


def model_forward(batch: PairBatch, model: torch.nn.Module) -> Tensor | tuple:
    """The model's output for ``batch`` (already on the model's device): ``[rows]``
    rewards, or ``(rewards or None, [m] per-token cross-entropy)`` when the batch
    asks for an LM loss (``lm_index``)."""
    extra = {}
    if batch.lm_index is not None:
        extra = {"lm_index": batch.lm_index, "lm_target": batch.lm_target}
    return model(
        batch.tokens,
        batch.position_ids,
        batch.attention_mask,
        batch.reward_index,
        reward_row=batch.reward_row,
        packed_seq_params=batch.packed_seq_params(),
        plain_positions=batch.max_position is None,
        max_position=batch.max_position,
        **extra,
    )


def forward_step(data_iterator: Iterator[PairBatch], model: torch.nn.Module, loss: LossFn):
    """megatron-core forward step: every pipeline stage reads the same micro-batch.

    Batches arrive on the host (pinned on CUDA); under context parallelism each is
    cut to this rank's share there (:mod:`megarm.model.context_split`), then moves to
    the model's device, asynchronously, one micro-batch at a time.
    """
    batch: PairBatch = next(data_iterator)
    size = parallel_state.get_context_parallel_world_size()
    if size > 1:
        config = get_model_config(model)
        multiple = config.tensor_model_parallel_size if config.sequence_parallel else 1
        batch = split_batch(batch, parallel_state.get_context_parallel_rank(), size, multiple)
    batch = batch.to(next(model.parameters()).device)
    return model_forward(batch, model), partial(loss, batch)


def holds_rewards() -> bool:
    """This rank reports the schedule's rewards and pair statistics: TP rank 0 and CP
    rank 0 of the last pipeline stage (one rank per data-parallel replica; the other
    TP and CP ranks hold the same values)."""
    return (
        parallel_state.is_pipeline_last_stage()
        and parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_context_parallel_rank() == 0
    )


def reward_outputs(batch: PairBatch, output: Tensor | tuple) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss of inference: none; the rewards are what the schedule returns."""
    rewards = output[0] if isinstance(output, tuple) else output
    return rewards.new_zeros(()), {"rewards": rewards.detach()}


def run_schedule(
    model: list[torch.nn.Module],
    batches: list[PairBatch],
    loss: LossFn = reward_outputs,
    forward_only: bool = True,
    seq_length: int | None = None,
    micro_batch_size: int | None = None,
) -> list[dict]:
    """One pass of megatron-core's pipeline schedule over ``batches``: what ``loss``
    returned for each micro-batch on the last pipeline stage (empty elsewhere).

    ``seq_length`` and ``micro_batch_size`` size the pipeline's activation messages
    (default: the largest batch's)."""
    # Every model chunk (virtual pipeline stage) reads the same micro-batches.
    iterators = [iter(batches) for _ in model]
    return get_forward_backward_func()(
        forward_step_func=partial(forward_step, loss=loss),
        data_iterator=iterators if len(iterators) > 1 else iterators[0],
        model=model if len(model) > 1 else model[0],
        num_microbatches=len(batches),
        seq_length=seq_length or max(b.tokens.shape[1] for b in batches),
        micro_batch_size=micro_batch_size or max(b.tokens.shape[0] for b in batches),
        forward_only=forward_only,
    )
