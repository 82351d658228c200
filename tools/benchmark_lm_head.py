#!/usr/bin/env python
"""Logits only where a loss is taken: megarm's LM head against full logits.

    python tools/benchmark_lm_head.py [--rows 2] [--seq 1024] [--supervised 0.25] \\
        [--hidden 896] [--vocab 151936] [--repeats 3]

On the same hidden states, supervised positions and weights, one forward and
backward of the LM loss two ways, each in a fresh process:

- ``gathered``: megarm's :meth:`RewardModel.lm_losses`: the supervised positions'
  hidden states are gathered first, so the output layer makes ``[m, vocab]``
  logits (m = supervised tokens);
- ``full``: the output layer on every position (``[rows * seq, vocab]`` logits, as
  megatron-core's GPTModel computes them), then the same vocab-parallel
  cross-entropy, summed over the supervised positions only.

Both give the same loss (checked); the report is the time per step and the peak
memory the step adds (the process's peak resident set after it, minus its resident
set before it), on the device it runs on (CPU here, fp32).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(variant: str, args: argparse.Namespace) -> dict:
    """One variant in this process: the loss, seconds per step, added peak bytes."""
    import torch
    from megatron.core import tensor_parallel

    from megarm import distributed
    from megarm.config import load_config
    from megarm.model.builder import build_model

    torch.manual_seed(0)
    distributed.init(1, 1)
    cfg = load_config(None, [
        "model.num_layers=1", f"model.hidden_size={args.hidden}", "model.ffn_hidden_size=256",
        "model.num_attention_heads=2", "model.num_query_groups=1", f"model.vocab_size={args.vocab}",
        "model.params_dtype=fp32", "training.objective=sft", "model.tie_word_embeddings=false",
    ])
    (model,) = build_model(cfg)
    s, b, h = args.seq, args.rows, args.hidden
    hidden = torch.randn(s, b, h) * 0.5
    supervised = torch.rand(s, b) < args.supervised
    targets = torch.randint(0, args.vocab, (s, b))
    index = supervised.reshape(-1).nonzero().squeeze(1)
    times, loss_value = [], None
    before = _status("VmRSS")
    for _ in range(args.repeats):
        x = hidden.clone().requires_grad_(True)
        start = time.perf_counter()
        if variant == "gathered":
            loss = model.lm_losses(x, index, targets.reshape(-1)[index]).sum()
        else:
            logits, _ = model.output_layer(x)  # [s, b, vocab]
            losses = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), targets)
            loss = (losses * supervised).sum()
        loss.backward()
        times.append(time.perf_counter() - start)
        loss_value = float(loss)
        model.zero_grad(set_to_none=True)
        del x, loss
    return {
        "variant": variant,
        "loss": loss_value,
        "supervised_tokens": int(supervised.sum()),
        "seconds": min(times),
        "peak_added_bytes": _status("VmHWM") - before,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--supervised", type=float, default=0.25, help="share of supervised tokens")
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variant", choices=("gathered", "full"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.variant:
        print(json.dumps(measure(args.variant, args)))
        return 0
    results = []
    for variant in ("gathered", "full"):
        cmd = [sys.executable, __file__, "--variant", variant, *(argv or sys.argv[1:])]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    gathered, full = results
    assert abs(gathered["loss"] - full["loss"]) <= 1e-4 * abs(full["loss"]), results
    print(f"{args.rows} rows x {args.seq} tokens, {gathered['supervised_tokens']} supervised, "
          f"hidden {args.hidden}, vocab {args.vocab}, fp32, loss {full['loss']:.3f} both ways")
    for r in results:
        print(f"  {r['variant']:>8}: {r['seconds'] * 1000:8.0f} ms per forward+backward, "
              f"peak +{r['peak_added_bytes'] / 2**30:.2f} GiB")
    print(f"  gathered/full: time {gathered['seconds'] / full['seconds']:.2f}x, memory "
          f"{gathered['peak_added_bytes'] / max(full['peak_added_bytes'], 1):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
