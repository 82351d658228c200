"""Generated preference pairs that a tiny model can learn, for smoke runs and tests.

Each pair shares a random prompt; the chosen response draws its tokens from a
"good" token set and the rejected one from a disjoint "bad" set, so a reward
model can separate them from content alone. Items have the same layout as
:class:`megarm.data.dataset.PairDataset` items.
"""

from __future__ import annotations

from typing import Any

import numpy as np

IGNORE_INDEX = -100


class SyntheticPairs:
    """``size`` deterministic pairs over token ids ``[first_id, vocab_size)``."""

    def __init__(
        self,
        size: int,
        vocab_size: int,
        seq_length: int,
        seed: int = 0,
        first_id: int = 1,
    ) -> None:
        if vocab_size - first_id < 8:
            raise ValueError("synthetic pairs need a vocabulary of at least 8 usable ids")
        if seq_length < 8:
            raise ValueError("synthetic pairs need seq_length >= 8")
        self.size = size
        self.vocab_size = vocab_size
        self.seq_length = seq_length
        self.seed = seed
        ids = np.random.RandomState(seed).permutation(np.arange(first_id, vocab_size))
        half = min(len(ids) // 2, 64)
        self.good, self.bad, self.prompt_ids = ids[:half], ids[half : 2 * half], ids

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.RandomState((self.seed * 1_000_003 + index) % 2**32)
        max_prompt = max(2, self.seq_length // 2)
        prompt = rng.choice(self.prompt_ids, rng.randint(2, max_prompt + 1))
        budget = self.seq_length - len(prompt)
        sample: dict[str, Any] = {}
        for key, pool in (("chosen", self.good), ("rejected", self.bad)):
            response = rng.choice(pool, rng.randint(1, budget + 1))
            ids = np.concatenate([prompt, response]).astype(np.int32)
            labels = ids.copy()
            labels[: len(prompt)] = IGNORE_INDEX
            sample[f"{key}_input_ids"] = ids
            sample[f"{key}_labels"] = labels
        sample["margin"] = 0.0
        return sample


class SyntheticRanked:
    """``size`` deterministic ranked records of ``num_responses`` responses each, the
    layout of :class:`megarm.data.dataset.RankedDataset` items.

    Response ``j`` of a record draws a share ``1 - j / (K - 1)`` of its tokens from the
    "good" set and the rest from the "bad" one, and scores ``K - 1 - j`` (distinct, the
    response order shuffled per record), so a reward model can learn the ranking from
    content alone."""

    def __init__(
        self,
        size: int,
        vocab_size: int,
        seq_length: int,
        num_responses: int = 4,
        seed: int = 0,
        first_id: int = 1,
    ) -> None:
        if num_responses < 2:
            raise ValueError("ranked records need at least 2 responses")
        self.pairs = SyntheticPairs(size, vocab_size, seq_length, seed, first_id)
        self.num_responses = num_responses

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        p = self.pairs
        rng = np.random.RandomState((p.seed * 1_000_003 + index + 7_777) % 2**32)
        k = self.num_responses
        prompt = rng.choice(p.prompt_ids, rng.randint(2, max(2, p.seq_length // 2) + 1))
        budget = p.seq_length - len(prompt)
        ids_list, labels_list, scores = [], [], []
        for j in rng.permutation(k):
            n = rng.randint(1, budget + 1)
            good = rng.random_sample(n) < 1.0 - j / (k - 1)
            response = np.where(good, rng.choice(p.good, n), rng.choice(p.bad, n))
            ids = np.concatenate([prompt, response]).astype(np.int32)
            labels = ids.copy()
            labels[: len(prompt)] = IGNORE_INDEX
            ids_list.append(ids)
            labels_list.append(labels)
            scores.append(float(k - 1 - j))
        return {
            "ranked_input_ids": ids_list,
            "ranked_labels": labels_list,
            "scores": np.asarray(scores, dtype=np.float32),
        }


class SyntheticRegression:
    """``size`` deterministic regression records of ``num_labels`` attributes, the
    layout of :class:`megarm.data.dataset.RegressionDataset` items.

    A record's response draws a random share ``q`` of its tokens from the "good"
    set; attribute ``a`` is ``4 q`` for even ``a`` and ``4 (1 - q)`` for odd ``a``
    (learnable from content alone), and every fifth record misses attribute
    ``index % num_labels`` (NaN), so the masked loss is exercised."""

    def __init__(
        self, size: int, vocab_size: int, seq_length: int, num_labels: int = 1, seed: int = 0,
        first_id: int = 1,
    ) -> None:
        self.pairs = SyntheticPairs(size, vocab_size, seq_length, seed, first_id)
        self.num_labels = num_labels

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        p = self.pairs
        rng = np.random.RandomState((p.seed * 1_000_003 + index + 99_991) % 2**32)
        prompt = rng.choice(p.prompt_ids, rng.randint(2, max(2, p.seq_length // 2) + 1))
        n = rng.randint(1, p.seq_length - len(prompt) + 1)
        q = rng.random_sample()
        response = np.where(rng.random_sample(n) < q, rng.choice(p.good, n), rng.choice(p.bad, n))
        ids = np.concatenate([prompt, response]).astype(np.int32)
        labels = ids.copy()
        labels[: len(prompt)] = IGNORE_INDEX
        targets = np.asarray([4 * q if a % 2 == 0 else 4 * (1 - q) for a in range(self.num_labels)],
                             dtype=np.float32)
        if self.num_labels > 1 and index % 5 == 0:
            targets[index % self.num_labels] = np.nan
        return {"input_ids": ids, "labels": labels, "targets": targets}


class SyntheticSteps:
    """``size`` deterministic step-labelled records, the layout of
    :class:`megarm.data.dataset.StepDataset` items (``data_path: null`` with
    ``training.objective: prm``).

    A record's solution is 1-4 steps of random length; a step is "good" when most of
    its tokens come from the good set, and its label is 1 while every step so far is
    good (a process label: the first bad step and every one after it are 0). A
    step's reward is read at its last token (no marker token: the ids are random)."""

    def __init__(
        self, size: int, vocab_size: int, seq_length: int, seed: int = 0, first_id: int = 1
    ) -> None:
        self.pairs = SyntheticPairs(size, vocab_size, seq_length, seed, first_id)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        p = self.pairs
        rng = np.random.RandomState((p.seed * 1_000_003 + index + 31_337) % 2**32)
        prompt = rng.choice(p.prompt_ids, rng.randint(2, max(2, p.seq_length // 4) + 1))
        budget = p.seq_length - len(prompt)
        steps = rng.randint(1, min(4, budget) + 1)
        cuts = np.sort(rng.choice(np.arange(1, budget + 1), steps, replace=False))
        parts, positions, targets, ok = [], [], [], True
        start = 0
        for end in cuts:
            n = int(end - start)
            good = rng.random_sample() < 0.6
            mostly = rng.random_sample(n) < (0.8 if good else 0.2)
            parts.append(np.where(mostly, rng.choice(p.good, n), rng.choice(p.bad, n)))
            ok = ok and good
            positions.append(len(prompt) + int(end) - 1)
            targets.append(1.0 if ok else 0.0)
            start = int(end)
        ids = np.concatenate([prompt, *parts]).astype(np.int32)
        labels = ids.copy()
        labels[: len(prompt)] = IGNORE_INDEX
        return {"input_ids": ids, "labels": labels,
                "step_positions": np.asarray(positions, dtype=np.int64),
                "step_targets": np.asarray(targets, dtype=np.float32)}
