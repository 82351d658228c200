"""Attention masks and reward positions for padded batches.

megarm's model takes megatron-core's mask convention: a bool ``[b, 1, s, s]`` tensor,
True where a query may *not* attend to a key; ``None`` means plain causal attention,
which is exact for right-padded rows (pads come after every real token, so no real
token ever sees one). Left-padded rows (or any padding pattern) need an explicit
mask that also blocks the pad keys; that is what :func:`padding_attention_mask` builds.
"""

from __future__ import annotations

import torch
from torch import Tensor


def padding_attention_mask(valid: Tensor) -> Tensor:
    """Causal + key-padding mask from ``valid`` (``[b, s]`` bool, True = real token).

    Returns ``[b, 1, s, s]`` bool, True = blocked. A query at a pad position would
    see no key at all under "causal and not pad" (a leading pad has only pads before
    it); softmax over an all-blocked row is 0/0 = NaN, and a NaN in a pad row's
    output leaks into real rows in the next layer because attention multiplies the
    pad positions' values by a zero weight (0 * NaN = NaN). So every query may attend
    to itself: pad rows then carry finite junk that no real query ever reads, and
    real rows are unchanged (their diagonal is already allowed).
    """
    if valid.dim() != 2:
        raise ValueError(f"valid must be [batch, seq], got shape {tuple(valid.shape)}")
    valid = valid.bool()
    seq = valid.shape[1]
    future = torch.ones(seq, seq, dtype=torch.bool, device=valid.device).triu(1)
    blocked = future.unsqueeze(0) | ~valid.unsqueeze(1)  # [b, s(query), s(key)]
    diagonal = torch.eye(seq, dtype=torch.bool, device=valid.device).unsqueeze(0)
    return (blocked & ~diagonal).unsqueeze(1)


