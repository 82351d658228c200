"""Micro-benchmarks of the packed (THD) attention path (issue 30, change 3):
``python tools/benchmark_packed_attention.py [--threads 1] [--repeats 12]``

1. RoPE: forward + backward of an h256, 4-layer trunk on one THD micro-batch of 16
   sequences, with megarm's per-micro-batch cos/sin applied in SDPAttention against
   megatron-core's per-layer THD RoPE (bitwise check included).
2. Segment outputs: one attention layer's per-segment SDPA, outputs joined by
   ``torch.cat`` against written into one preallocated buffer.
Median ms after two warm-ups, alternating; one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def _median_ms(samples: list[float]) -> float:
    return round(1000 * statistics.median(samples[2:]), 1)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=12)
    args = parser.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from megarm import distributed
    from megarm.config import load_config
    from megarm.data.packing import collate_thd
    from megarm.data.synthetic import SyntheticPairs
    from megarm.model.builder import build_model
    from megarm.model.step import forward_step
    from megarm.training.data import to_pair_batch
    from megarm.training.loss import loss_func

    torch.set_num_threads(args.threads)
    cfg = load_config(None, [
        "model.num_layers=4", "model.hidden_size=256", "model.ffn_hidden_size=704",
        "model.num_attention_heads=4", "model.num_query_groups=2", "model.vocab_size=2048",
        "model.max_position_embeddings=1024", "model.params_dtype=fp32", "data.seq_length=512"])
    distributed.init(seed=0)
    (model,) = build_model(cfg)
    data = SyntheticPairs(64, 2048, 512, seed=3)
    batch = to_pair_batch(collate_thd([data[i] for i in range(8)], 0))

    def step(flag: bool) -> tuple:
        model.rope_in_sdpa = flag
        model.zero_grad(set_to_none=True)
        rewards, fn = forward_step(iter([batch]), model, loss_func)
        fn(rewards)[0].backward()
        return rewards.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    old, new = step(False), step(True)
    bitwise = torch.equal(old[0], new[0]) and all(
        torch.equal(a, b) for a, b in zip(old[1], new[1], strict=True))
    rope: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeats):
        for flag in (False, True):
            start = time.perf_counter()
            step(flag)
            rope[flag].append(time.perf_counter() - start)

    lengths = [int(x) for x in torch.randint(100, 480, (16,), generator=torch.Generator().manual_seed(0))]
    t, n, d = sum(lengths), 4, 64

    def attend(q, k, v):  # noqa: ANN001, ANN202
        out = F.scaled_dot_product_attention(
            q.permute(1, 0, 2)[None], k.permute(1, 0, 2)[None], v.permute(1, 0, 2)[None],
            is_causal=True, enable_gqa=True)
        return out[0].permute(1, 0, 2).reshape(q.shape[0], -1)

    def cat_way(q, k, v):  # noqa: ANN001, ANN202
        return torch.cat([attend(a, b, c) for a, b, c in
                          zip(q.split(lengths), k.split(lengths), v.split(lengths), strict=True)])

    def buffer_way(q, k, v):  # noqa: ANN001, ANN202
        out, at = q.new_empty(t, n * d), 0
        for a, b, c in zip(q.split(lengths), k.split(lengths), v.split(lengths), strict=True):
            out[at:at + a.shape[0]] = attend(a, b, c)
            at += a.shape[0]
        return out

    q = torch.randn(t, n, d, requires_grad=True)
    k = torch.randn(t, 2, d, requires_grad=True)
    v = torch.randn(t, 2, d, requires_grad=True)
    g = torch.randn(t, n * d)
    joins: dict[str, list[float]] = {"cat": [], "buffer": []}
    for _ in range(args.repeats):
        for name, fn in (("cat", cat_way), ("buffer", buffer_way)):
            start = time.perf_counter()
            fn(q, k, v).backward(g)
            joins[name].append(time.perf_counter() - start)
            q.grad = k.grad = v.grad = None
    print(json.dumps({
        "threads": args.threads, "rope_tokens": int(batch.tokens.shape[1]),
        "rope_segments": len(batch.seq_lengths), "rope_bitwise": bitwise,
        "rope_per_layer_ms": _median_ms(rope[False]), "rope_once_ms": _median_ms(rope[True]),
        "join_tokens": t, "join_cat_ms": _median_ms(joins["cat"]),
        "join_buffer_ms": _median_ms(joins["buffer"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
