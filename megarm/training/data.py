"""Training and validation micro-batches for this rank, from the config.

``training.objective: sft`` reads SFT records (one row each), ``rm`` and ``joint``
preference pairs (two rows each), ``listwise`` ranked records (K rows each, with
their scores), ``regression`` records (one row each, with their attribute labels). With an LM loss (``sft``, ``joint``) each
micro-batch also carries the positions whose next token is supervised and those
tokens, found here on the host (:func:`lm_positions`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from megarm import platform
from megarm.config import ConfigError, ConfigIssue, MegarmConfig, packed_format
from megarm.data.blend import parse_data_path
from megarm.data.dataset import (
    IGNORE_INDEX,
    PairBatchSampler,
    Subset,
    build_pair_datasets,
    collate_pairs,
    split_ranges,
)
from megarm.data.packing import collate_packed, collate_thd
from megarm.data.stats_file import recorded_pad_id
from megarm.data.synthetic import (
    SyntheticPairs,
    SyntheticRanked,
    SyntheticRegression,
    SyntheticSteps,
)
from megarm.model.step import PairBatch


@dataclass
class Datasets:
    """The splits a run trains and evaluates on, and the pad id to batch them with."""

    train: Any
    valid: Any | None
    pad_token_id: int


def _tokenizer(cfg: MegarmConfig) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cfg.data.tokenizer_name_or_path)


def pad_token_id(cfg: MegarmConfig, tokenizer: Any = None) -> int:
    """Pad id: the tokenizer's (from its config files, no model load), else the
    dataset's stats.json, else 0. Right padding keeps it out of every reward."""
    if cfg.data.tokenizer_name_or_path:
        tok = tokenizer if tokenizer is not None else _tokenizer(cfg)
        if tok.pad_token_id is not None:
            return int(tok.pad_token_id)
    if cfg.data.data_path:
        value = recorded_pad_id(parse_data_path(cfg.data.data_path)[0][1])
        if value is not None:
            return value
    return 0


def check_vocabulary(cfg: MegarmConfig, tokenizer: Any = None) -> None:
    """Before the first step: the data's token ids fit ``model.vocab_size`` and, with
    ``data.tokenizer_name_or_path``, that tokenizer is the one the data was made with
    (its vocabulary hash equals stats.json's) and fits the model. The config validator
    already checked the id recorded in stats.json; older stats.json lack it, so the
    ``.bin`` files are scanned here. Raises :class:`ConfigError` naming the key."""
    from megarm.data.dataset import check_vocab
    from megarm.data.integrity import (
        max_token_id,
        tokenizer_problem,
        vocab_problem,
        warn_unrecorded_max_token_id,
    )

    issues: list[ConfigIssue] = []
    vocab_size = cfg.model.vocab_size
    for _, prefix in parse_data_path(cfg.data.data_path):  # type: ignore[arg-type]
        largest = max_token_id(prefix)
        if largest is None:
            warn_unrecorded_max_token_id(prefix)
            largest = max_token_id(prefix, compute=True)
        if problem := vocab_problem(largest, vocab_size, f"data.data_path {prefix}"):
            issues.append(ConfigIssue("model.vocab_size", problem))
        if tokenizer is not None:
            try:
                check_vocab(prefix, tokenizer)
            except ValueError as exc:
                issues.append(ConfigIssue("data.tokenizer_name_or_path", str(exc)))
    if tokenizer is not None:
        name = cfg.data.tokenizer_name_or_path
        if problem := tokenizer_problem(tokenizer, vocab_size, str(name)):
            issues.append(ConfigIssue("data.tokenizer_name_or_path", problem))
    if issues:
        raise ConfigError(issues)


def build_datasets(cfg: MegarmConfig) -> Datasets:
    """Train/valid splits from ``data.data_path``, or synthetic pairs when unset.

    Real data is checked against the model and tokenizer first
    (:func:`check_vocabulary`; the files themselves are checked by the config
    validator and again when opened)."""
    if cfg.data.data_path:
        tokenizer = _tokenizer(cfg) if cfg.data.tokenizer_name_or_path else None
        check_vocabulary(cfg, tokenizer)
        train, valid, _ = build_pair_datasets(cfg.data.data_path, cfg.data.split)
        if train is None or len(train) == 0:
            raise ValueError(f"data.data_path {cfg.data.data_path!r} gives an empty training split")
        return Datasets(train, valid, pad_token_id(cfg, tokenizer))
    pairs: Any = SyntheticPairs(
        cfg.data.synthetic_num_pairs,
        min(cfg.model.vocab_size, 1024),
        cfg.data.seq_length,
        seed=cfg.training.seed,
    )
    if cfg.training.objective == "listwise":
        pairs = SyntheticRanked(
            cfg.data.synthetic_num_pairs,
            min(cfg.model.vocab_size, 1024),
            cfg.data.seq_length,
            cfg.data.synthetic_num_responses,
            seed=cfg.training.seed,
        )
    if cfg.training.objective == "regression":
        pairs = SyntheticRegression(
            cfg.data.synthetic_num_pairs,
            min(cfg.model.vocab_size, 1024),
            cfg.data.seq_length,
            cfg.model.num_labels,
            seed=cfg.training.seed,
        )
    if cfg.training.objective == "prm":
        pairs = SyntheticSteps(
            cfg.data.synthetic_num_pairs,
            min(cfg.model.vocab_size, 1024),
            cfg.data.seq_length,
            seed=cfg.training.seed,
        )
    if cfg.training.objective == "sft":
        pairs = ChosenAsSFT(pairs)
    (t0, t1), (v0, v1), _ = split_ranges(len(pairs), cfg.data.split)
    return Datasets(Subset(pairs, t0, t1), Subset(pairs, v0, v1) if v1 > v0 else None, 0)


class ChosenAsSFT:
    """Synthetic SFT records: each synthetic pair's chosen side, its response
    supervised (``data_path: null`` with ``training.objective: sft``)."""

    def __init__(self, pairs: Any) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.pairs[index]
        return {"input_ids": sample["chosen_input_ids"], "labels": sample["chosen_labels"]}


def lm_positions(
    labels: torch.Tensor, position_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lm_index, lm_target)`` of a collated ``[rows, s]`` micro-batch, on the host.

    Token ``t`` is supervised when its label is not -100; it is predicted from
    position ``t - 1`` of the same sequence, so a token that starts a sequence
    (position id 0: a packed sequence's first token) never is. ``lm_index`` holds
    ``(t - 1) * rows + row``, the flat index into the model's ``[s, rows]`` layout,
    whatever the layout (padded rows, packed rows, one THD stream)."""
    rows = labels.shape[0]
    supervised = (labels[:, 1:] != IGNORE_INDEX) & (position_ids[:, 1:] != 0)
    row, before = supervised.nonzero(as_tuple=True)
    return before * rows + row, labels[:, 1:][row, before]


def add_reward_offsets(batch: PairBatch, offsets: Sequence[int]) -> PairBatch:
    """``batch`` reading each sequence's reward also ``k`` tokens before its reward
    token, for each ``k`` in ``offsets`` (``training.reward_offsets``): the
    ``reward_index`` (and ``reward_row``) of the ``n`` sequences followed by ``n`` more
    per offset, so one forward gives ``[n * (1 + len(offsets))]`` rewards. A position
    never leaves its own sequence (packed rows: clamped at the sequence's first token)."""
    if not offsets or not batch.num_pairs:
        return batch
    index = batch.reward_index
    rows = batch.reward_row if batch.reward_row is not None else torch.arange(index.shape[0])
    # Positions restart per packed sequence: the reward token's position is how far back
    # its sequence starts.
    back = batch.position_ids[rows, index]
    extra = [index - torch.clamp(back, max=k) for k in offsets]
    batch.reward_index = torch.cat([index, *extra])
    batch.reward_row = torch.cat([rows] * (1 + len(offsets)))
    return batch


def to_pair_batch(collated: dict[str, torch.Tensor], lm: bool = False) -> PairBatch:
    """Collated right-padded rows -> the model's micro-batch, still on the host.

    A packed micro-batch (:func:`megarm.data.packing.collate_packed` or
    :func:`~megarm.data.packing.collate_thd`) brings its own positions, reward rows
    and block-diagonal mask or ``cu_seqlens``. What the model must know about the
    layout (largest position, THD segment lengths) is read here, from host tensors,
    so the step never reads it back from the device; ``forward_step`` moves the
    batch to the device (asynchronously from pinned memory on CUDA). With ``lm`` the
    supervised positions and their count are found here too (:func:`lm_positions`)."""
    batch = _layout(collated)
    if lm:
        index, target = lm_positions(collated["labels"], batch.position_ids)
        if platform.pin_memory():
            index, target = index.pin_memory(), target.pin_memory()
        batch.lm_index, batch.lm_target, batch.lm_tokens = index, target, int(index.shape[0])
    return batch


def _layout(collated: dict[str, torch.Tensor]) -> PairBatch:
    batch = _rows(collated)
    batch.scores, batch.valid = collated.get("scores"), collated.get("valid")
    batch.targets, batch.target_mask = collated.get("targets"), collated.get("target_mask")
    if "step_targets" in collated:
        read_steps(batch, collated)
    return batch


def read_steps(batch: PairBatch, collated: dict[str, torch.Tensor]) -> None:
    """Step-labelled records: read the value head at every step's marker instead of
    each sequence's last token. A sequence is contiguous in its row in every layout
    (padded, packed rows, THD), so its step at offset ``o`` lies at ``o`` past where
    its last token's position says it starts."""
    lengths = collated["lengths"]
    rows = batch.reward_row if batch.reward_row is not None else torch.arange(len(lengths))
    start = batch.reward_index - lengths + 1
    sequence = collated["step_sequence"]
    batch.reward_index = start[sequence] + collated["step_offsets"]
    batch.reward_row = rows[sequence]
    batch.lengths = lengths
    batch.step_targets, batch.step_sequence = collated["step_targets"], sequence


def _rows(collated: dict[str, torch.Tensor]) -> PairBatch:
    tokens = collated["tokens"]
    if "reward_row" in collated:
        cu = collated.get("cu_seqlens")
        return PairBatch(
            tokens=tokens,
            position_ids=collated["position_ids"],
            reward_index=collated["reward_index"],
            margin=collated["margin"],
            labels=collated["labels"],
            attention_mask=collated.get("attention_mask"),
            reward_row=collated["reward_row"],
            cu_seqlens=cu,
            max_seqlen=collated.get("max_seqlen"),
            seq_lengths=None if cu is None else tuple((cu[1:] - cu[:-1]).tolist()),
            max_position=int(collated["position_ids"].max()),
        )
    rows, seq = tokens.shape
    return PairBatch(
        tokens=tokens,
        position_ids=torch.arange(seq).expand(rows, seq).contiguous(),
        reward_index=collated["lengths"] - 1,
        margin=collated["margin"],
        labels=collated["labels"],
    )


def micro_batches(
    dataset: Any,
    cfg: MegarmConfig,
    pad_id: int,
    dp_rank: int,
    dp_size: int,
    consumed_samples: int = 0,
    shuffle: bool = True,
    reward_offsets: Sequence[int] = (),
) -> Iterator[PairBatch]:
    """Endless stream of this data-parallel rank's micro-batches, resumable at
    ``consumed_samples`` (counted over all ranks). With ``data.packing`` each
    micro-batch holds the same pairs, packed into rows or one THD stream
    (:mod:`megarm.data.packing`, :func:`megarm.config.packed_format`).
    ``reward_offsets``: :func:`add_reward_offsets` (training batches only)."""
    # Sequence parallelism scatters the sequence over TP ranks.
    multiple = cfg.parallel.tensor_model_parallel_size if cfg.parallel.sequence_parallel else 1
    layout = packed_format(cfg)
    if layout == "thd":
        collate = partial(collate_thd, pad_token_id=pad_id, pad_to_multiple_of=multiple)
    elif layout == "rows":
        collate = partial(
            collate_packed,
            pad_token_id=pad_id,
            seq_length=cfg.data.seq_length,
            pad_to_multiple_of=multiple,
        )
    else:
        collate = partial(collate_pairs, pad_token_id=pad_id, pad_to_multiple_of=multiple)
    sampler = PairBatchSampler(
        len(dataset),
        cfg.training.micro_batch_size,
        dp_rank,
        dp_size,
        consumed_samples,
        shuffle,
        cfg.training.seed,
    )
    # Pinned host memory (CUDA) lets forward_step's copy to the device run async.
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, pin_memory=platform.pin_memory()
    )
    lm = cfg.training.objective in ("sft", "joint")
    for collated in loader:
        yield add_reward_offsets(to_pair_batch(collated, lm=lm), reward_offsets)
