"""The training-side dataset: files, splits, blends, collate and the DP sampler."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megarm.data.dataset import (
    BlendedPairDataset,
    PairBatchSampler,
    PairDataset,
    build_pair_datasets,
    collate_pairs,
    packed_path,
    split_ranges,
    stats_path,
    validate_data_path,
)
from tests.helpers import build_data_loader


def write_pairs(prefix: Path, n: int, base: int = 0, margin: bool = False) -> str:
    """``n`` pairs: pair i has prompt [base+i, base+i] and responses of length 1 + i % 3
    (chosen) and 2 (rejected), written with megatron-core's IndexedDatasetBuilder."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix.parent.mkdir(parents=True, exist_ok=True)
    keys = ["chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"]
    keys += ["margin"] if margin else []
    builders = {
        k: IndexedDatasetBuilder(
            packed_path(str(prefix), k) + ".bin", dtype=np.float32 if k == "margin" else np.int32
        )
        for k in keys
    }
    for i in range(n):
        prompt = [base + i] * 2
        for side, response in (("chosen", [7] * (1 + i % 3)), ("rejected", [8, 8])):
            tokens = np.array(prompt + response, dtype=np.int32)
            labels = np.array([-100] * 2 + response, dtype=np.int32)
            builders[f"{side}_input_ids"].add_document(tokens, [len(tokens)])
            builders[f"{side}_labels"].add_document(labels, [len(labels)])
        if margin:
            builders["margin"].add_document(np.array([i / 2], dtype=np.float32), [1])
    for k, builder in builders.items():
        builder.finalize(packed_path(str(prefix), k) + ".idx")
    return str(prefix)


def test_pair_dataset_reads_all_keys(tmp_path):
    prefix = write_pairs(tmp_path / "a", 5, margin=True)
    dataset = PairDataset(prefix)
    assert len(dataset) == 5 and dataset.has_margin
    sample = dataset[4]
    assert sample["chosen_input_ids"].tolist() == [4, 4, 7, 7]
    assert sample["chosen_labels"].tolist() == [-100, -100, 7, 7]
    assert sample["rejected_input_ids"].tolist() == [4, 4, 8, 8]
    assert sample["margin"] == 2.0
    assert PairDataset(write_pairs(tmp_path / "b", 2))[1]["margin"] == 0.0


def test_missing_key_and_count_mismatch(tmp_path):
    prefix = write_pairs(tmp_path / "a", 4)
    Path(packed_path(prefix, "rejected_labels") + ".idx").unlink()
    with pytest.raises(FileNotFoundError, match="rejected_labels"):
        PairDataset(prefix)
    problems = validate_data_path(f"0.5 {prefix} 0.5 {tmp_path / 'nothing'}")
    assert len(problems) == 2
    assert "rejected_labels" in problems[0] and "nothing" in problems[1]
    assert validate_data_path("0.5") != []  # a weight without a prefix

    mixed = write_pairs(tmp_path / "m", 4)
    write_pairs(tmp_path / "other", 3)
    for ext in (".bin", ".idx"):
        source = Path(packed_path(str(tmp_path / "other"), "chosen_labels") + ext)
        source.replace(packed_path(mixed, "chosen_labels") + ext)
    with pytest.raises(ValueError, match="m_packed_chosen_labels_document.idx has 3 pairs, not 4"):
        PairDataset(mixed)
    assert validate_data_path(str(tmp_path / "b_missing"))[0].startswith("no files")


def test_vocab_hash_check(tmp_path):
    prefix = write_pairs(tmp_path / "a", 2)
    Path(stats_path(prefix)).write_text(
        json.dumps({"tokenizer": {"name_or_path": "tok-A", "vocab_sha256": "aaa"}})
    )
    assert len(PairDataset(prefix, expected_vocab_sha256="aaa")) == 2
    with pytest.raises(ValueError, match="tokenized with 'tok-A' .*vocab sha256 aaa"):
        PairDataset(prefix, expected_vocab_sha256="bbb")


def test_split_ranges():
    assert split_ranges(100, "98,2,0") == [(0, 98), (98, 100), (100, 100)]
    assert split_ranges(10, "8,1,1") == [(0, 8), (8, 9), (9, 10)]
    assert split_ranges(7, "1/1/1") == [(0, 2), (2, 5), (5, 7)]  # 7/3 -> 2, 14/3 -> 5
    assert split_ranges(5, "1") == [(0, 5), (5, 5), (5, 5)]
    with pytest.raises(ValueError):
        split_ranges(5, "a,b")


def test_build_splits_and_blend(tmp_path):
    a = write_pairs(tmp_path / "a", 10)
    b = write_pairs(tmp_path / "b", 10, base=100)
    train, valid, test = build_pair_datasets(a, "8,1,1")
    assert (len(train), len(valid), len(test)) == (8, 1, 1)
    assert [train[0]["chosen_input_ids"][0], valid[0]["chosen_input_ids"][0]] == [0, 8]
    assert test[0]["chosen_input_ids"][0] == 9

    train, valid, test = build_pair_datasets(
        f"0.7 {a} 0.3 {b}", "8,2,0", blend_sizes=(10, None, None)
    )
    assert isinstance(train, BlendedPairDataset) and test is None
    # Greedy: pick the dataset furthest below its share (weight * max(k, 1) - taken).
    assert train.dataset_index.tolist() == [0, 1, 0, 0, 1, 0, 0, 1, 0, 0]
    firsts = [int(train[k]["chosen_input_ids"][0]) for k in range(10)]
    assert firsts == [0, 100, 1, 2, 101, 3, 4, 102, 5, 6]
    assert len(valid) == 4  # 2 + 2 validation pairs, default size = their total
    # Past a part's end the blend wraps around inside it.
    wrap = BlendedPairDataset([train.datasets[0]], [1.0], 10)
    assert int(wrap[8]["chosen_input_ids"][0]) == 0


def test_collate_pads_and_stacks_chosen_then_rejected():
    samples = [
        {
            "chosen_input_ids": [1, 2, 3],
            "chosen_labels": [-100, 2, 3],
            "rejected_input_ids": [1, 4],
            "rejected_labels": [-100, 4],
            "margin": 0.5,
        },
        {
            "chosen_input_ids": [5],
            "chosen_labels": [5],
            "rejected_input_ids": [5, 6, 7, 8],
            "rejected_labels": [-100, -100, 7, 8],
            "margin": 1.0,
        },
    ]
    batch = collate_pairs(samples, pad_token_id=0)
    assert batch["tokens"].tolist() == [[1, 2, 3, 0], [5, 0, 0, 0], [1, 4, 0, 0], [5, 6, 7, 8]]
    assert batch["labels"].tolist() == [
        [-100, 2, 3, -100],
        [5, -100, -100, -100],
        [-100, 4, -100, -100],
        [-100, -100, 7, 8],
    ]
    assert batch["lengths"].tolist() == [3, 1, 2, 4]
    assert batch["margin"].tolist() == [0.5, 1.0]
    assert batch["tokens"].dtype == torch.long and batch["margin"].dtype == torch.float32
    fixed = collate_pairs(samples, pad_token_id=9, seq_length=6, pad_to_multiple_of=4)
    assert fixed["tokens"].shape == (4, 8) and fixed["tokens"][1].tolist() == [5] + [9] * 7
    no_margin = [{k: v for k, v in s.items() if k != "margin"} for s in samples]
    assert collate_pairs(no_margin, 0)["margin"].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="4 tokens exceeds seq_length 3"):
        collate_pairs(samples, 0, seq_length=3)


def test_sampler_sequential_dp_slices_and_resume():
    def batches(rank, consumed=0, steps=3):
        sampler = PairBatchSampler(10, 2, rank, 2, consumed_samples=consumed, shuffle=False)
        iterator = iter(sampler)
        return [next(iterator) for _ in range(steps)]

    assert batches(0) == [[0, 1], [4, 5], [8, 9]]
    assert batches(1) == [[2, 3], [6, 7], [0, 1]]  # position 10, 11 wrap to epoch 1
    assert batches(0, consumed=4, steps=2) == [[4, 5], [8, 9]]
    finite = PairBatchSampler(10, 2, 1, 2, consumed_samples=4, shuffle=False, num_samples=12)
    assert list(finite) == [[6, 7], [0, 1]] and len(finite) == 2


def test_sampler_shuffle_is_a_permutation_per_epoch_and_resumable():
    def take(rank, consumed, steps):
        iterator = iter(PairBatchSampler(12, 3, rank, 2, consumed_samples=consumed, seed=7))
        return [next(iterator) for _ in range(steps)]

    # Two steps of 3 x 2 ranks = one epoch of 12: every sample exactly once.
    epoch0 = [i for step in range(2) for rank in range(2) for i in take(rank, 0, 2)[step]]
    assert sorted(epoch0) == list(range(12)) and epoch0 != list(range(12))
    epoch1 = [i for rank in range(2) for i in take(rank, 12, 1)[0]]
    assert epoch1 == [i for rank in range(2) for i in take(rank, 0, 3)[2]]
    # Resuming at consumed_samples=6 continues exactly.
    assert take(0, 6, 2) == take(0, 0, 3)[1:]
    expected = np.random.RandomState(7).permutation(12)[:3].tolist()
    assert take(0, 0, 1)[0] == expected


def test_data_loader_end_to_end(tmp_path):
    dataset = PairDataset(write_pairs(tmp_path / "a", 6, margin=True))
    loader = build_data_loader(
        dataset,
        micro_batch_size=2,
        pad_token_id=0,
        data_parallel_rank=1,
        data_parallel_size=2,
        shuffle=False,
        num_samples=8,
    )
    batches = list(loader)
    assert len(batches) == 2
    first = batches[0]  # pairs 2 and 3 (rank 1 of the first global batch)
    assert first["tokens"].tolist() == [
        [2, 2, 7, 7, 7],
        [3, 3, 7, 0, 0],
        [2, 2, 8, 8, 0],
        [3, 3, 8, 8, 0],
    ]
    assert first["lengths"].tolist() == [5, 3, 4, 4]
    assert first["margin"].tolist() == [1.0, 1.5]
    assert batches[1]["tokens"][:, :2].tolist() == [[0, 0], [1, 1], [0, 0], [1, 1]]
