"""Cheap start-up checks of a preprocessed prefix, before any step is taken.

A ``.bin`` cut short, an ``.idx`` copied from another dataset, sequences longer than
``data.seq_length`` or token ids beyond the model's vocabulary would otherwise show
up iterations later as a shape error, or never (an out-of-range id is silently
wrong under tensor parallelism). Everything here reads only the ``.idx`` files, the
``.bin`` sizes and ``<prefix>_stats.json`` with numpy, so ``python -m megarm.config``
runs it too (no torch). Each problem is one line naming the file and the fix.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from megarm.data.blend import files_kind, packed_files
from megarm.data.stats_file import RERUN, DataFileError, read_stats, stats_path

MARGIN_KEY = "margin"
SCORES_KEY = "scores"  # ranked records: K float32 scores per record
TARGETS_KEY = "targets"  # regression records: num_labels float32 per record
POSITIONS_KEY = "step_positions"  # step-labelled records: marker positions per record
STEP_TARGETS_KEY = "step_targets"  # and one float32 label per position
FLOAT_KEYS = (MARGIN_KEY, SCORES_KEY, TARGETS_KEY, STEP_TARGETS_KEY)
IGNORE_INDEX = -100
SAMPLED_PAIRS = 64  # pairs whose tokens are compared across the four files
INDEX_HEADER = b"MMIDIDX\x00\x00"
# megatron-core's indexed_dataset.DType codes.
DTYPE_CODES = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
    6: np.float64, 7: np.float32, 8: np.uint16,
}
_HEADER_BYTES = 34  # magic 9 + version 8 + dtype 1 + sequence count 8 + document count 8


@dataclass(frozen=True)
class IndexFile:
    """What one ``.idx`` says about its ``.bin``."""

    path: str
    dtype: np.dtype
    lengths: np.ndarray  # int32, one per sequence
    pointers: np.ndarray  # int64 byte offsets into the .bin
    documents: np.ndarray  # int64 sequence indices where documents start

    @property
    def count(self) -> int:
        return len(self.lengths)

    def bin_bytes(self) -> int:
        """The size the ``.bin`` must have."""
        if not self.count:
            return 0
        return int(self.pointers[-1]) + int(self.lengths[-1]) * self.dtype.itemsize


def read_index(path: str) -> IndexFile:
    """Parse a megatron-core ``.idx`` (version 1); raise :class:`DataFileError` naming
    ``path`` when it is not one, or is cut short or padded."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            header = handle.read(_HEADER_BYTES)
    except OSError as exc:
        raise DataFileError(f"cannot read {path}: {exc.strerror}") from exc
    if len(header) < _HEADER_BYTES or header[:9] != INDEX_HEADER:
        raise DataFileError(f"{path} is not a megatron-core index file (bad header); {RERUN}")
    version = int.from_bytes(header[9:17], "little")
    code = header[17]
    count = int.from_bytes(header[18:26], "little")
    documents = int.from_bytes(header[26:34], "little")
    if version != 1 or code not in DTYPE_CODES:
        raise DataFileError(f"{path}: unknown index version {version} or dtype code {code}")
    expected = _HEADER_BYTES + count * (4 + 8) + documents * 8
    if size != expected:
        raise DataFileError(
            f"{path} has {size} bytes but its header ({count} sequences, {documents} "
            f"documents) needs {expected}: the file is cut or damaged; {RERUN}"
        )
    raw = np.memmap(path, mode="r", dtype=np.uint8)
    lengths = np.frombuffer(raw, np.int32, count, _HEADER_BYTES)
    pointers = np.frombuffer(raw, np.int64, count, _HEADER_BYTES + 4 * count)
    starts = np.frombuffer(raw, np.int64, documents, _HEADER_BYTES + 12 * count)
    return IndexFile(path, np.dtype(DTYPE_CODES[code]), lengths, pointers, starts)


def _check_index(index: IndexFile, key: str, one_per_document: bool = True) -> None:
    """The index agrees with its own .bin and with one document per pair (a ranked
    record's document holds its K sequences: ``one_per_document`` False)."""
    bin_path = index.path[: -len(".idx")] + ".bin"
    want = np.float32 if key in FLOAT_KEYS else np.int32
    if index.dtype != want:
        raise DataFileError(
            f"{index.path} holds {index.dtype} but {key} must be {np.dtype(want)}; {RERUN}"
        )
    actual = os.path.getsize(bin_path)
    if actual != index.bin_bytes():
        raise DataFileError(
            f"{bin_path} has {actual} bytes but {os.path.basename(index.path)} describes "
            f"{index.bin_bytes()} ({index.count} sequences): the .bin is cut or the .idx "
            f"belongs to other data; {RERUN}"
        )
    if index.count:
        steps = index.lengths[:-1].astype(np.int64) * index.dtype.itemsize
        if index.pointers[0] != 0 or not np.array_equal(np.diff(index.pointers), steps):
            raise DataFileError(f"{index.path}: byte offsets do not follow the lengths; {RERUN}")
    if not one_per_document:
        docs = index.documents
        if len(docs) < 1 or docs[0] != 0 or docs[-1] != index.count or np.any(np.diff(docs) < 1):
            raise DataFileError(
                f"{index.path}: its document boundaries do not split its {index.count} "
                f"sequences into records; {RERUN}"
            )
    elif not np.array_equal(index.documents, np.arange(index.count + 1)):
        raise DataFileError(
            f"{index.path} does not hold one sequence per pair ({len(index.documents) - 1} "
            f"documents for {index.count} sequences); {RERUN}"
        )


def _odd_one(
    indexes: dict[str, IndexFile], measure: Any, stats_value: Any, what: str, prefix: str
) -> str | None:
    """A message naming the file whose ``measure`` disagrees (with stats.json when it
    records the value, else with the majority), or ``None`` when all agree."""
    values = {key: measure(index) for key, index in indexes.items()}
    if stats_value is not None:
        wrong = [key for key, value in values.items() if value != stats_value]
        reference = f"{stats_value} in {stats_path(prefix)}"
    else:
        if len(set(values.values())) <= 1:
            return None
        common = max(set(values.values()), key=list(values.values()).count)
        wrong = [key for key, value in values.items() if value != common]
        reference = f"{common} in the other files"
    if not wrong:
        return None
    key = wrong[0]
    return (
        f"{indexes[key].path} has {values[key]} {what}, not {reference}: it belongs to "
        f"another run; {RERUN}"
    )


def sides(files: dict[str, str]) -> list[tuple[str, str, str]]:
    """``(name in stats.json, input ids key, labels key)`` of each sequence a record
    holds: chosen and rejected for pairs, one sequence for SFT records."""
    if "ranked_input_ids" in files:
        return [("responses", "ranked_input_ids", "ranked_labels")]
    if "input_ids" in files:
        return [("sequences", "input_ids", "labels")]
    return [(side, f"{side}_input_ids", f"{side}_labels") for side in ("chosen", "rejected")]


def check_files(prefix: str) -> IndexFile:
    """Check the packed files of ``prefix`` against each other and its stats.json;
    return the first input-ids index. Raise :class:`DataFileError` naming the file
    that is wrong."""
    stats = read_stats(prefix) or {}
    files = packed_files(prefix)
    if files_kind(files) == "ranked":
        return _check_ranked(prefix, files, stats)
    keys = [key for _, ids, labels in sides(files) for key in (ids, labels)]
    indexes = {key: read_index(files[key] + ".idx")
               for key in (*keys, MARGIN_KEY, TARGETS_KEY, POSITIONS_KEY, STEP_TARGETS_KEY)
               if key in files}
    for key, index in indexes.items():
        _check_index(index, key)
    kept = (stats.get("counts") or {}).get("kept")
    unit = "records" if "input_ids" in files else "pairs"
    problem = _odd_one(indexes, lambda i: i.count, kept, unit, prefix)
    if problem:
        raise DataFileError(problem)
    tokens = stats.get("tokens") or {}
    for side, ids_key, labels_key in sides(files):
        pair = {k: indexes[k] for k in (ids_key, labels_key)}
        problem = _odd_one(pair, lambda i: int(i.lengths.sum(dtype=np.int64)), tokens.get(side),
                           f"{side} tokens", prefix)
        if problem:
            raise DataFileError(problem)
        ids, labels = pair.values()
        _same_lengths(ids, labels, "the length of pair", "tokens")
    if MARGIN_KEY in indexes and np.any(indexes[MARGIN_KEY].lengths != 1):
        raise DataFileError(f"{indexes[MARGIN_KEY].path} must hold one value per pair; {RERUN}")
    if TARGETS_KEY in indexes:
        names = stats.get("label_names")
        want = len(names) if isinstance(names, list) else int(indexes[TARGETS_KEY].lengths[:1].max(initial=0))
        if np.any(indexes[TARGETS_KEY].lengths != want):
            raise DataFileError(
                f"{indexes[TARGETS_KEY].path} must hold {want} labels per record "
                f"(label_names {names} in {stats_path(prefix)}); {RERUN}"
            )
    if POSITIONS_KEY in indexes or STEP_TARGETS_KEY in indexes:
        _check_steps(prefix, indexes, stats)
    if stats:  # megarm's own layout: labels mask a prefix (a prompt both sides share)
        # Critique pairs supervise the critique only: their masked prefixes differ.
        _check_sampled_pairs(indexes, sides(files), stats.get("kind", "pairs") == "pairs")
    return indexes[sides(files)[0][1]]


def _same_lengths(a: IndexFile, b: IndexFile, what: str, unit: str) -> None:
    """Two files written together hold documents of equal lengths; the first that
    differs is named (one of the files belongs to another run)."""
    differ = np.flatnonzero(a.lengths != b.lengths)
    if len(differ):
        i = int(differ[0])
        raise DataFileError(
            f"{a.path} and {b.path} disagree on {what} {i} ({a.lengths[i]} vs {b.lengths[i]} "
            f"{unit}) and {len(differ) - 1} more: one of them belongs to another run; {RERUN}"
        )


def _as_recorded(index: IndexFile, recorded: int | None, unit: str, prefix: str) -> None:
    """``index`` holds as many elements in all as stats.json recorded (when it did)."""
    total = int(index.lengths.sum(dtype=np.int64))
    if recorded is not None and total != recorded:
        raise DataFileError(
            f"{index.path} has {total} {unit}, not {recorded} in {stats_path(prefix)}: it "
            f"belongs to another run; {RERUN}"
        )


def _check_steps(prefix: str, indexes: dict[str, IndexFile], stats: dict[str, Any]) -> None:
    """Step-labelled records: one label per marker position, the positions strictly
    increasing inside each row, the token there the marker stats.json records, and
    the step count stats.json records."""
    for key in (POSITIONS_KEY, STEP_TARGETS_KEY):
        if key not in indexes:
            raise DataFileError(f"{prefix}: missing {prefix}_packed_{key}_document.idx; {RERUN}")
    positions, targets, ids = indexes[POSITIONS_KEY], indexes[STEP_TARGETS_KEY], indexes["input_ids"]
    _same_lengths(positions, targets, "the steps of record", "positions vs labels")
    if np.any(positions.lengths < 1):
        raise DataFileError(f"{positions.path} has a record without a step; {RERUN}")
    _as_recorded(positions, (stats.get("steps") or {}).get("steps"), "steps", prefix)
    at = np.memmap(positions.path[: -len(".idx")] + ".bin", mode="r", dtype=np.int32)
    labels = np.memmap(targets.path[: -len(".idx")] + ".bin", mode="r", dtype=np.float32)
    tokens = np.memmap(ids.path[: -len(".idx")] + ".bin", mode="r", dtype=np.int32)
    marker = (stats.get("step_marker") or {}).get("id")
    if not np.all((labels >= 0) & (labels <= 1)):
        raise DataFileError(f"{targets.path} holds labels outside [0, 1]; {RERUN}")
    count = positions.count
    for i in np.unique(np.linspace(0, count - 1, min(count, SAMPLED_PAIRS)).astype(np.int64)):
        start = int(positions.pointers[i]) // 4
        row = at[start : start + int(positions.lengths[i])]
        if np.any(np.diff(row) < 1) or row[0] < 0 or row[-1] >= ids.lengths[i]:
            raise DataFileError(
                f"{positions.path}: the step positions of record {i} are not increasing "
                f"positions of its {ids.lengths[i]}-token row; {RERUN}"
            )
        first = int(ids.pointers[i]) // 4
        if marker is not None and np.any(tokens[first + row] != marker):
            raise DataFileError(
                f"{positions.path}: record {i} has a step position whose token is not the step "
                f"marker {marker} in {stats_path(prefix)}: the files belong to different runs; "
                f"{RERUN}"
            )


def _check_ranked(prefix: str, files: dict[str, str], stats: dict[str, Any]) -> IndexFile:
    """:func:`check_files` for ranked records: the K sequences of each record are one
    document in the input-ids and labels files (the same boundaries in both), the
    scores file holds one document of K scores per record, and the counts agree
    with stats.json."""
    ids = read_index(files["ranked_input_ids"] + ".idx")
    labels = read_index(files["ranked_labels"] + ".idx")
    scores = read_index(files[SCORES_KEY] + ".idx")
    _check_index(ids, "ranked_input_ids", one_per_document=False)
    _check_index(labels, "ranked_labels", one_per_document=False)
    _check_index(scores, SCORES_KEY)
    if not np.array_equal(ids.documents, labels.documents) or not np.array_equal(
        ids.lengths, labels.lengths
    ):
        raise DataFileError(
            f"{ids.path} and {labels.path} disagree on the records' responses or their "
            f"lengths: one of them belongs to another run; {RERUN}"
        )
    per_record = np.diff(ids.documents)
    kept = (stats.get("counts") or {}).get("kept")
    for index, count in ((ids, len(per_record)), (scores, scores.count)):
        if kept is not None and count != kept:
            raise DataFileError(
                f"{index.path} has {count} records, not {kept} in {stats_path(prefix)}: it "
                f"belongs to another run; {RERUN}"
            )
    if scores.count != len(per_record) or not np.array_equal(scores.lengths, per_record):
        raise DataFileError(
            f"{scores.path} does not hold one score per response of {ids.path} "
            f"({scores.count} score lists for {len(per_record)} records); {RERUN}"
        )
    if len(per_record) and per_record.min() < 2:
        raise DataFileError(f"{ids.path} has a record with fewer than 2 responses; {RERUN}")
    _as_recorded(ids, (stats.get("tokens") or {}).get("responses"), "tokens", prefix)
    if stats:
        _check_sampled_pairs({"ranked_input_ids": ids, "ranked_labels": labels},
                             sides(files), shared_prompt=False)
    return ids


def _check_sampled_pairs(
    indexes: dict[str, IndexFile], layout: list[tuple[str, str, str]], shared_prompt: bool = True
) -> None:
    """For up to :data:`SAMPLED_PAIRS` records spread over the data: each sequence's
    labels are -100 over a prefix and equal its input ids after it, and (plain
    pairs) both sides share that prefix, the prompt. Files of the same shape from
    another run fail this."""
    count = indexes[layout[0][1]].count
    unit = "pair" if len(layout) == 2 else "record"
    tokens = {
        key: np.memmap(index.path[: -len(".idx")] + ".bin", mode="r", dtype=np.int32)
        if index.bin_bytes() else np.zeros(0, np.int32)
        for key, index in indexes.items() if key not in FLOAT_KEYS
    }

    def row(key: str, i: int) -> np.ndarray:
        index = indexes[key]
        start = int(index.pointers[i]) // 4
        return tokens[key][start : start + int(index.lengths[i])]

    for i in np.unique(np.linspace(0, count - 1, min(count, SAMPLED_PAIRS)).astype(np.int64)):
        prompts = []
        for _, ids_key, labels_key in layout:
            ids, labels = row(ids_key, i), row(labels_key, i)
            masked = int(np.argmax(labels != IGNORE_INDEX)) if np.any(labels != IGNORE_INDEX) \
                else len(labels)
            if np.any(labels[masked:] == IGNORE_INDEX) or not np.array_equal(
                labels[masked:], ids[masked:]
            ):
                raise DataFileError(
                    f"{indexes[ids_key].path} and {indexes[labels_key].path} "
                    f"hold different tokens for {unit} {i}: one of them belongs to another run; "
                    f"{RERUN}"
                )
            prompts.append(ids[:masked])
        if shared_prompt and len(prompts) == 2 and not np.array_equal(*prompts):
            raise DataFileError(
                f"{indexes['chosen_input_ids'].path} and {indexes['rejected_input_ids'].path} "
                f"hold different prompts for pair {i}: one of them belongs to another run; {RERUN}"
            )


def length_problem(prefix: str, seq_length: int, max_positions: int | None = None) -> str | None:
    """Why the pairs of ``prefix`` do not fit ``seq_length`` tokens (from the lengths
    in the index), or ``None``."""
    files = packed_files(prefix)
    longest = np.max(
        [read_index(files[ids] + ".idx").lengths for _, ids, _ in sides(files)], axis=0
    )
    over = int(np.count_nonzero(longest > seq_length))
    if not over:
        return None
    limit = f" (up to model.max_position_embeddings {max_positions})" if max_positions else ""
    return (
        f"{over} of {len(longest)} {'sequences' if 'ranked_input_ids' in files else 'records' if 'input_ids' in files else 'pairs'} in "
        f"{prefix} have a sequence longer than "
        f"data.seq_length {seq_length} (longest {int(longest.max())} tokens); re-run "
        f"tools/preprocess_data.py --overwrite --seq-length {seq_length} (prompts are cut, "
        f"responses never), or raise data.seq_length{limit}"
    )


def max_token_id(prefix: str, compute: bool = False) -> int | None:
    """The largest token id in the pairs of ``prefix``: recorded in stats.json by
    preprocessing; for older stats.json read from the ``.bin`` files when
    ``compute`` (one pass over the input ids, memory-mapped), else ``None``."""
    stats = read_stats(prefix) or {}
    if isinstance(stats.get("max_token_id"), int):
        return stats["max_token_id"]
    if not compute:
        return None
    files = packed_files(prefix)
    largest = -1
    for _, key, _ in sides(files):
        tokens = np.memmap(files[key] + ".bin", mode="r", dtype=np.int32)
        step = 1 << 26  # 256 MiB at a time
        for start in range(0, len(tokens), step):
            largest = max(largest, int(tokens[start : start + step].max()))
    return largest


def vocab_problem(largest: int | None, vocab_size: int, what: str) -> str | None:
    """Why token ids up to ``largest`` (from ``what``) do not fit a model with
    ``vocab_size`` embeddings, or ``None``."""
    if largest is None or largest < vocab_size:
        return None
    return (
        f"{what} holds token id {largest} but model.vocab_size is {vocab_size}: the data was "
        "tokenized for another model. Use the tokenizer of this model (re-run "
        "tools/preprocess_data.py) or the model this data was made for"
    )


def tokenizer_problem(tokenizer: Any, vocab_size: int, what: str) -> str | None:
    """Why ``tokenizer`` (named ``what``) cannot feed a model with ``vocab_size``
    embeddings: it has more tokens than the model. ``None`` when it fits."""
    size = len(tokenizer)
    if size <= vocab_size:
        return None
    return (
        f"tokenizer {what} has {size} tokens but the model's vocab_size is {vocab_size}: "
        "ids above it have no embedding. Use the tokenizer the model was trained with"
    )


def prefix_issues(
    prefix: str, seq_length: int, vocab_size: int, max_positions: int | None = None
) -> list[tuple[str, str]]:
    """``(config key, message)`` for every start-up problem of ``prefix`` that the files
    alone show (the config validator's part; the tokenizer needs transformers)."""
    try:
        check_files(prefix)
    except DataFileError as exc:
        return [("data.data_path", str(exc))]
    issues = []
    problem = length_problem(prefix, seq_length, max_positions)
    if problem:
        issues.append(("data.seq_length", problem))
    problem = vocab_problem(max_token_id(prefix), vocab_size, stats_path(prefix))
    if problem:
        issues.append(("model.vocab_size", problem))
    return issues


def warn_unrecorded_max_token_id(prefix: str) -> None:
    """Older preprocessing did not record ``max_token_id``; say how to get it recorded."""
    warnings.warn(
        f"{prefix}_stats.json records no max_token_id (older preprocessing): the .bin files "
        f"were scanned for it; {RERUN} to record it",
        stacklevel=2,
    )
