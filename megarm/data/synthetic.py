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
