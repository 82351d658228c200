"""The preference-pair dataset that training reads.

On disk (written by ``tools/preprocess_data.py``), one pair is one document in each of
the megatron-core indexed datasets ``<prefix>_packed_<key>_document.{bin,idx}`` with
keys ``chosen_input_ids``, ``chosen_labels``, ``rejected_input_ids``, ``rejected_labels``
(int32; labels are -100 over the prompt) and optionally ``margin`` (float32, one
element per document), next to ``<prefix>_stats.json``.

This module finds and opens those files (``PairDataset``), splits them into
train/valid/test ranges, blends several prefixes with weights, batches chosen and
rejected into one ``[2b, s]`` forward (``collate_pairs``) and hands each data-parallel
rank its slice of every global micro-batch (``PairBatchSampler``), resumable from a
single ``consumed_samples`` count.

Importing it is cheap (no torch, no megatron-core) so the config validator can call
:func:`validate_data_path`; those libraries load when a dataset is opened.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from megarm.data.blend import (
    PRM_KEYS,
    RANKED_KEYS,
    REGRESSION_KEYS,
    REQUIRED_KEYS,
    SFT_KEYS,
    data_kind,
    packed_files,
    parse_data_path,
    prefix_problems,
)
from megarm.data.stats_file import stats_path

PAIR_KEYS = REQUIRED_KEYS
MARGIN_KEY = "margin"
IGNORE_INDEX = -100


def packed_path(prefix: str, key: str) -> str:
    """The indexed-dataset path prefix (no .bin/.idx) of ``key`` under ``prefix``."""
    return f"{prefix}_packed_{key}_document"


def rejects_path(prefix: str) -> str:
    """``<prefix>_rejects.jsonl``: one line per rejected record, with its reason."""
    return f"{prefix}_rejects.jsonl"


def _megatron_datasets_module(name: str) -> Any:
    # Importing megatron-core takes seconds and warns about TE/apex, which data code
    # never uses: import on first use, without those warnings.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
        return importlib.import_module(f"megatron.core.datasets.{name}")


def megatron_indexed_dataset() -> Any:
    """``megatron.core.datasets.indexed_dataset`` (imported on first use)."""
    return _megatron_datasets_module("indexed_dataset")


# --------------------------------------------------------------------------- datasets


def validate_data_path(data_path: str | Sequence[str]) -> list[str]:
    """Every problem with ``data_path`` (unparsable blend, missing files or keys)."""
    try:
        blend = parse_data_path(data_path)  # type: ignore[arg-type]
    except ValueError as exc:
        return [str(exc)]
    return [problem for _, prefix in blend for problem in prefix_problems(prefix)]


def open_indexed(
    prefix: str, keys: Sequence[str] | None, expected_vocab_sha256: str | None, mmap: bool
) -> dict[str, Any]:
    """megatron-core ``IndexedDataset`` readers of ``prefix``'s ``keys`` (``None``: the
    pair keys, and the margin's when present), after the files' integrity check and,
    with ``expected_vocab_sha256``, the tokenizer check against stats.json."""
    problems = prefix_problems(prefix)
    if problems:
        raise FileNotFoundError("; ".join(problems))
    from megarm.data.integrity import check_files

    check_files(prefix)  # sizes and counts agree, before megatron-core maps them
    indexed = megatron_indexed_dataset()
    found = packed_files(prefix)
    if keys is None:
        keys = PAIR_KEYS + ((MARGIN_KEY,) if MARGIN_KEY in found else ())
    files = {key: indexed.IndexedDataset(found[key], mmap=mmap) for key in keys}
    if expected_vocab_sha256 is not None:
        check_vocab(prefix, expected_vocab_sha256)
    return files


class PairDataset:
    """The pairs under one prefix, read with megatron-core's ``IndexedDataset``.

    ``pair_dataset[i]`` is a dict of int32 arrays for the four keys plus ``margin``
    (float; 0.0 when the data has none). ``expected_vocab_sha256`` (from
    :func:`megarm.data.tokenizer.vocab_sha256`) is checked against
    ``<prefix>_stats.json`` when given.
    """

    def __init__(
        self, prefix: str, expected_vocab_sha256: str | None = None, mmap: bool = True
    ) -> None:
        self.prefix = prefix
        self.files = open_indexed(prefix, None, expected_vocab_sha256, mmap)
        self.size = len(self.files[PAIR_KEYS[0]])
        self.has_margin = MARGIN_KEY in self.files

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample: dict[str, Any] = {key: self.files[key][index] for key in PAIR_KEYS}
        sample[MARGIN_KEY] = float(self.files[MARGIN_KEY][index][0]) if self.has_margin else 0.0
        return sample


class SFTDataset:
    """The SFT records under one prefix (``tools/preprocess_data.py --handler-name
    sft``): ``sft_dataset[i]`` is ``{"input_ids", "labels"}`` (int32; labels -100
    except over the supervised target tokens)."""

    def __init__(
        self, prefix: str, expected_vocab_sha256: str | None = None, mmap: bool = True
    ) -> None:
        self.prefix = prefix
        self.files = open_indexed(prefix, SFT_KEYS, expected_vocab_sha256, mmap)
        self.size = len(self.files["input_ids"])

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {key: self.files[key][index] for key in SFT_KEYS}


class RankedDataset:
    """The ranked records under one prefix (``tools/preprocess_data.py --handler-name
    ranked`` or ``ultrafeedback_ranked``): ``ranked_dataset[i]`` is ``{"ranked_input_ids":
    [K int32 arrays], "ranked_labels": [K int32 arrays], "scores": float32 [K]}``. A
    record is one document of K sequences in the input-ids and labels files, and one
    document of K scores."""

    def __init__(
        self, prefix: str, expected_vocab_sha256: str | None = None, mmap: bool = True
    ) -> None:
        self.prefix = prefix
        self.files = open_indexed(prefix, RANKED_KEYS, expected_vocab_sha256, mmap)
        self.documents = np.asarray(self.files["ranked_input_ids"].document_indices)
        self.size = len(self.documents) - 1

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.size:
            raise IndexError(index)
        start, stop = int(self.documents[index]), int(self.documents[index + 1])
        ids, labels = self.files["ranked_input_ids"], self.files["ranked_labels"]
        return {
            "ranked_input_ids": [ids[j] for j in range(start, stop)],
            "ranked_labels": [labels[j] for j in range(start, stop)],
            "scores": np.array(self.files["scores"][index], dtype=np.float32),  # a copy
        }


class RegressionDataset(SFTDataset):
    """The regression records under one prefix (``--handler-name regression`` or
    ``helpsteer2``): ``dataset[i]`` is ``{"input_ids", "labels", "targets"}``, the
    targets float32 ``[num_labels]`` (NaN where the record has no label);
    ``label_names`` from stats.json."""

    def __init__(
        self, prefix: str, expected_vocab_sha256: str | None = None, mmap: bool = True
    ) -> None:
        super().__init__(prefix, expected_vocab_sha256, mmap)
        indexed = megatron_indexed_dataset()
        self.files["targets"] = indexed.IndexedDataset(packed_files(prefix)["targets"], mmap=mmap)
        from megarm.data.stats_file import read_stats

        self.label_names = list((read_stats(prefix) or {}).get("label_names") or [])

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = {key: self.files[key][index] for key in REGRESSION_KEYS}
        item["targets"] = np.array(item["targets"], dtype=np.float32)  # a copy
        return item


class StepDataset:
    """The step-labelled records under one prefix (``--handler-name prm_steps`` or
    ``math_shepherd``): ``dataset[i]`` is ``{"input_ids", "labels", "step_positions",
    "step_targets"}``: the row, its labels (-100 over the prompt), the positions of
    its step-end markers in the row (int32) and one label per position (float32, 1.0
    a good step); ``step_marker`` (text and token id) and ``step_labels`` (hard or
    soft) from stats.json."""

    def __init__(
        self, prefix: str, expected_vocab_sha256: str | None = None, mmap: bool = True
    ) -> None:
        from megarm.data.stats_file import read_stats

        self.prefix = prefix
        self.files = open_indexed(prefix, PRM_KEYS, expected_vocab_sha256, mmap)
        self.size = len(self.files["input_ids"])
        stats = read_stats(prefix) or {}
        self.step_marker = dict(stats.get("step_marker") or {})
        self.step_labels = stats.get("step_labels", "hard")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = {key: self.files[key][index] for key in PRM_KEYS}
        item["step_positions"] = np.array(item["step_positions"], dtype=np.int64)
        item["step_targets"] = np.array(item["step_targets"], dtype=np.float32)
        return item


def open_dataset(prefix: str, expected_vocab_sha256: str | None = None) -> Any:
    """:class:`SFTDataset`, :class:`RankedDataset` or :class:`PairDataset`, whichever
    ``prefix`` holds."""
    kind = data_kind(prefix)
    if kind == "ranked":
        return RankedDataset(prefix, expected_vocab_sha256)
    if kind == "regression":
        return RegressionDataset(prefix, expected_vocab_sha256)
    if kind == "prm":
        return StepDataset(prefix, expected_vocab_sha256)
    if kind == "sft":
        return SFTDataset(prefix, expected_vocab_sha256)
    return PairDataset(prefix, expected_vocab_sha256)


def check_vocab(prefix: str, expected: str | Any) -> None:
    """Raise if ``<prefix>_stats.json`` records another vocabulary than ``expected``
    (a sha256 from :func:`megarm.data.tokenizer.vocab_sha256`, or a tokenizer)."""
    from megarm.data.tokenizer import vocab_sha256

    if not isinstance(expected, str):
        expected = vocab_sha256(expected)
    path = stats_path(prefix)
    if not os.path.exists(path):
        warnings.warn(f"{path} is missing; cannot check the tokenizer of {prefix!r}", stacklevel=2)
        return
    with open(path, encoding="utf-8") as handle:
        stats = json.load(handle)
    recorded = stats.get("tokenizer", {}).get("vocab_sha256")
    if recorded != expected:
        raise ValueError(
            f"{prefix!r} was tokenized with {stats.get('tokenizer', {}).get('name_or_path')!r} "
            f"(vocab sha256 {recorded}), not the tokenizer given (vocab sha256 {expected}); "
            "re-run tools/preprocess_data.py with this tokenizer"
        )


class Subset:
    """Samples ``[start, stop)`` of a dataset (a contiguous split)."""

    def __init__(self, dataset: Any, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= len(dataset):
            raise IndexError(f"range [{start}, {stop}) outside a dataset of {len(dataset)}")
        self.dataset, self.start, self.stop = dataset, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.dataset[self.start + index]


def split_ranges(size: int, split: str | Sequence[float]) -> list[tuple[int, int]]:
    """Contiguous train/valid/test ``[start, stop)`` ranges of ``size`` samples.

    ``split`` is ``"98,2,0"`` (or ``"98/2/0"``, or numbers); up to three weights,
    normalised. Bounds are the rounded cumulative fractions, so the ranges tile
    ``[0, size)`` exactly (Megatron's convention).
    """
    if isinstance(split, str):
        try:
            weights = [float(x) for x in split.replace("/", ",").split(",") if x.strip()]
        except ValueError:
            raise ValueError(
                f"split {split!r} is not comma-separated numbers like '98,2,0'"
            ) from None
    else:
        weights = [float(x) for x in split]
    if not 1 <= len(weights) <= 3 or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"split {split!r}: give 1-3 non-negative weights with a positive sum")
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    bounds = [0]
    cumulative = 0.0
    for weight in weights:
        cumulative += weight
        bounds.append(min(size, math.floor(cumulative / total * size + 0.5)))
    bounds[-1] = size
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


class BlendedPairDataset:
    """``size`` samples drawn from ``datasets`` in proportion to ``weights``.

    Sample ``k`` comes from the dataset whose share is furthest behind its weight
    (megatron-core's ``build_blending_indices``); within a dataset samples are taken in
    order and wrap around when it is exhausted.
    """

    def __init__(self, datasets: Sequence[Any], weights: Sequence[float], size: int) -> None:
        if len(datasets) != len(weights) or not datasets:
            raise ValueError("need one weight per dataset")
        if any(len(d) == 0 for d in datasets):
            raise ValueError("cannot blend an empty dataset")
        helpers_cpp = _megatron_datasets_module("helpers_cpp")
        normalised = np.asarray(weights, dtype=np.float64)
        normalised /= normalised.sum()
        self.datasets = list(datasets)
        self.weights = normalised
        self.dataset_index = np.zeros(size, dtype=np.int16)
        self.sample_index = np.zeros(size, dtype=np.int64)
        helpers_cpp.build_blending_indices(
            self.dataset_index, self.sample_index, normalised, len(datasets), size, False
        )

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        dataset = self.datasets[self.dataset_index[index]]
        return dataset[int(self.sample_index[index]) % len(dataset)]


def build_pair_datasets(
    data_path: str | Sequence[str],
    split: str | Sequence[float] = "98,2,0",
    expected_vocab_sha256: str | None = None,
    blend_sizes: Sequence[int | None] = (None, None, None),
) -> list[Any | None]:
    """``[train, valid, test]`` for a prefix or a weighted blend (``None`` for empty splits).

    Each prefix is split into contiguous ranges first; a split's parts are then blended
    by the data_path weights. A blend has ``blend_sizes[i]`` samples (default: the
    parts' total).
    """
    blend = parse_data_path(data_path)
    kinds = {data_kind(prefix) for _, prefix in blend}
    if len(kinds) > 1:
        raise ValueError(
            f"data_path {data_path!r} blends {' and '.join(sorted(map(str, kinds)))} data; "
            "train each kind in its own run (training.objective sft for SFT records, "
            "listwise for ranked records, rm or joint for preference pairs)"
        )
    opened = [(weight, open_dataset(prefix, expected_vocab_sha256)) for weight, prefix in blend]
    result: list[Any | None] = []
    for which in range(3):
        parts = []
        for weight, dataset in opened:
            start, stop = split_ranges(len(dataset), split)[which]
            if stop > start:
                parts.append((weight, Subset(dataset, start, stop)))
        if not parts:
            result.append(None)
        elif len(parts) == 1:
            result.append(parts[0][1])
        else:
            size = blend_sizes[which] or sum(len(d) for _, d in parts)
            result.append(BlendedPairDataset([d for _, d in parts], [w for w, _ in parts], size))
    return result


# --------------------------------------------------------------------------- batching


def sample_rows(samples: Sequence[dict[str, Any]]) -> tuple[list, list]:
    """Token ids and labels of a micro-batch's sequences, in the order rewards and
    losses use them: one per SFT record, a ranked record's K responses record after
    record (so one record's responses always share the micro-batch), or chosen of
    pairs ``0..b-1`` then rejected."""
    if "ranked_input_ids" in samples[0]:
        rows = [row for s in samples for row in s["ranked_input_ids"]]
        return rows, [row for s in samples for row in s["ranked_labels"]]
    if "input_ids" in samples[0]:
        return [s["input_ids"] for s in samples], [s["labels"] for s in samples]
    rows = [s["chosen_input_ids"] for s in samples] + [s["rejected_input_ids"] for s in samples]
    labels = [s["chosen_labels"] for s in samples] + [s["rejected_labels"] for s in samples]
    return rows, labels


def sample_margins(samples: Sequence[dict[str, Any]]) -> Any:
    """``[b]`` float32 margins of ``b`` pairs (0 where none); empty for SFT records."""
    import torch

    if "input_ids" in samples[0] or "ranked_input_ids" in samples[0]:
        return torch.zeros(0, dtype=torch.float32)
    return torch.tensor([float(s.get(MARGIN_KEY, 0.0)) for s in samples], dtype=torch.float32)


def sample_ranks(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``scores`` ``[n, K]`` float32 and ``valid`` ``[n, K]`` bool of ``n`` ranked
    records (``K`` the most responses of any; a shorter record's slots past its own
    responses are invalid, score 0); empty for other records. Row-major order of the
    valid slots is the order of :func:`sample_rows`."""
    import torch

    if "step_targets" in samples[0]:  # step-labelled records: one entry per step
        return {
            "step_offsets": torch.as_tensor(np.concatenate(
                [np.asarray(s["step_positions"], np.int64) for s in samples])),
            "step_targets": torch.as_tensor(np.concatenate(
                [np.asarray(s["step_targets"], np.float32) for s in samples])),
            "step_sequence": torch.as_tensor(np.concatenate(
                [np.full(len(s["step_positions"]), i, np.int64) for i, s in enumerate(samples)])),
        }
    if "targets" in samples[0]:
        targets = torch.as_tensor(np.stack([np.asarray(s["targets"], np.float32) for s in samples]))
        mask = torch.isfinite(targets)
        return {"targets": targets.masked_fill(~mask, 0.0), "target_mask": mask}
    if "ranked_input_ids" not in samples[0]:
        return {}
    k = max(len(s["scores"]) for s in samples)
    scores = torch.zeros(len(samples), k, dtype=torch.float32)
    valid = torch.zeros(len(samples), k, dtype=torch.bool)
    for i, s in enumerate(samples):
        n = len(s["scores"])
        scores[i, :n] = torch.as_tensor(np.asarray(s["scores"], dtype=np.float32))
        valid[i, :n] = True
    return {"scores": scores, "valid": valid}


def collate_pairs(
    samples: Sequence[dict[str, Any]],
    pad_token_id: int,
    seq_length: int | None = None,
    pad_to_multiple_of: int = 1,
) -> dict[str, Any]:
    """Micro-batch of ``b`` pairs for one forward over ``2b`` rows.

    Returns ``tokens`` and ``labels`` ``[2b, s]`` (rows ``0..b-1`` chosen, ``b..2b-1``
    rejected; right-padded with ``pad_token_id`` / -100 to the longest row, or to
    ``seq_length`` when given, then up to a multiple of ``pad_to_multiple_of``),
    ``lengths`` ``[2b]`` (the reward is read at ``lengths - 1``) and ``margin`` ``[b]``.
    ``b`` SFT records give ``b`` rows and an empty ``margin``.
    """
    import torch

    if not samples:
        raise ValueError("collate_pairs needs at least one pair")
    rows, label_rows = sample_rows(samples)
    lengths = [len(row) for row in rows]
    width = seq_length if seq_length is not None else max(lengths)
    if max(lengths) > width:
        raise ValueError(
            f"a sequence of {max(lengths)} tokens exceeds seq_length {width}; re-run "
            f"tools/preprocess_data.py with --seq-length {width}"
        )
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    tokens = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (row, label_row) in enumerate(zip(rows, label_rows, strict=True)):
        tokens[i, : len(row)] = torch.from_numpy(np.asarray(row, dtype=np.int64))
        labels[i, : len(row)] = torch.from_numpy(np.asarray(label_row, dtype=np.int64))
    return {
        "tokens": tokens,
        "labels": labels,
        "lengths": torch.tensor(lengths, dtype=torch.long),
        "margin": sample_margins(samples),
        **sample_ranks(samples),
    }


class PairBatchSampler:
    """This data-parallel rank's micro-batches of sample indices, resumable.

    Global position ``p`` (counted over all ranks, like Megatron's ``consumed_samples``)
    maps to sample ``perm_e[p % n]`` with epoch ``e = p // n`` and ``perm_e`` a seeded
    permutation (identity without shuffle). Each step covers
    ``micro_batch_size * data_parallel_size`` positions; rank ``r`` takes the ``r``-th
    run of ``micro_batch_size``. Restarting with the saved ``consumed_samples`` continues
    exactly where the run stopped. Iterates for ever unless ``num_samples`` is given.
    """

    def __init__(
        self,
        dataset_size: int,
        micro_batch_size: int,
        data_parallel_rank: int = 0,
        data_parallel_size: int = 1,
        consumed_samples: int = 0,
        shuffle: bool = True,
        seed: int = 1234,
        num_samples: int | None = None,
    ) -> None:
        if dataset_size < 1:
            raise ValueError("cannot sample from an empty dataset")
        if micro_batch_size < 1 or data_parallel_size < 1:
            raise ValueError("micro_batch_size and data_parallel_size must be >= 1")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(
                f"data_parallel_rank {data_parallel_rank} not in [0, {data_parallel_size})"
            )
        self.size = dataset_size
        self.micro_batch_size = micro_batch_size
        self.rank = data_parallel_rank
        self.dp_size = data_parallel_size
        self.consumed_samples = consumed_samples
        self.shuffle = shuffle
        self.seed = seed
        self.num_samples = num_samples
        self._epoch: int | None = None
        self._perm: np.ndarray | None = None

    def index(self, position: int) -> int:
        """The sample index at global ``position``."""
        epoch, offset = divmod(position, self.size)
        if not self.shuffle:
            return offset
        if epoch != self._epoch:
            # RandomState's stream is frozen across numpy versions: resumes stay exact.
            rng = np.random.RandomState((self.seed + epoch) % 2**32)
            self._perm, self._epoch = rng.permutation(self.size), epoch
        return int(self._perm[offset])  # type: ignore[index]

    def __iter__(self) -> Iterator[list[int]]:
        step = self.micro_batch_size * self.dp_size
        position = self.consumed_samples
        while self.num_samples is None or position + step <= self.num_samples:
            first = position + self.rank * self.micro_batch_size
            yield [self.index(first + j) for j in range(self.micro_batch_size)]
            position += step

    def __len__(self) -> int:
        if self.num_samples is None:
            raise TypeError("an endless sampler has no length; pass num_samples")
        step = self.micro_batch_size * self.dp_size
        return max(0, (self.num_samples - self.consumed_samples) // step)


