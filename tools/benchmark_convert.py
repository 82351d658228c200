"""Measure the converters' peak memory and time on a generated multi-GB checkpoint.

    python tools/benchmark_convert.py --workdir /tmp/convbench \\
        [--hidden-size 1536 --num-layers 16 --ffn-hidden-size 8960 --heads 12 --kv-heads 2] \\
        [--dtype fp32] [--max-shard-size 1GB] [--keep]

Writes a random HF ``Qwen2ForCausalLM`` (untied, real Qwen2.5 vocabulary) shard by
shard, then runs, each in a fresh process, ``hf2mcore.py`` (torch_dist, and legacy
TP2xPP2) and ``mcore2hf.py``, and reports each one's peak RSS (its own ``VmHWM``,
see ``megarm.platform.host.measure_peak_rss``), wall time, and the import-only baseline
of a process that loads the same libraries. Prints a Markdown table for
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GiB = 1024**3




def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="scratch directory (emptied first)")
    p.add_argument("--hidden-size", type=int, default=1536)
    p.add_argument("--num-layers", type=int, default=16)
    p.add_argument("--ffn-hidden-size", type=int, default=8960)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=151936)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--max-shard-size", default="1GB", help="HF shard size of the input")
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from ckpt_convert.random_qwen2 import CONVERTER_IMPORTS
    from megarm.platform.host import measure_peak_rss

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    itemsize = {"fp32": 4, "bf16": 2}[args.dtype]
    started = time.perf_counter()
    # Generated in a child: this process stays small, so the children it forks do
    # not inherit (and report in ru_maxrss) a large parent image.
    generate = (
        "import json, sys, torch; from pathlib import Path;"
        "from ckpt_convert.random_qwen2 import write_random_qwen2;"
        f"info = write_random_qwen2(Path({str(work / 'hf')!r}), hidden_size={args.hidden_size},"
        f" num_layers={args.num_layers}, ffn_hidden_size={args.ffn_hidden_size},"
        f" num_attention_heads={args.heads}, num_query_groups={args.kv_heads},"
        f" vocab_size={args.vocab_size}, dtype=torch.{'float32' if itemsize == 4 else 'bfloat16'},"
        f" max_shard_size={args.max_shard_size!r});"
        "print(json.dumps(info))"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-c", generate], env=env, capture_output=True, text=True, check=True
    )
    info = json.loads(out.stdout.strip().splitlines()[-1])
    layer = (
        args.hidden_size * args.hidden_size * (2 + 2 * args.kv_heads / args.heads)
        + 3 * args.hidden_size * args.ffn_hidden_size
    ) * itemsize
    print(
        f"input: {info['total_bytes'] / 1e9:.2f} GB in {info['files']} shards "
        f"(largest shard {info['largest_shard_bytes'] / GiB:.2f} GiB, largest tensor "
        f"{info['largest_tensor_bytes'] / GiB:.2f} GiB, one layer {layer / GiB:.3f} GiB), "
        f"written in {time.perf_counter() - started:.0f}s",
        flush=True,
    )
    convert = str(REPO / "ckpt_convert" / "hf2mcore.py")
    export = str(REPO / "ckpt_convert" / "mcore2hf.py")
    runs = [
        ("import-only baseline", ["-c", CONVERTER_IMPORTS]),
        (
            f"hf2mcore.py torch_dist, {args.dtype}",
            [convert, "--load-dir", str(work / "hf"), "--save-dir", str(work / "mcore"),
             "--params-dtype", args.dtype],
        ),
        (
            f"hf2mcore.py --format legacy TP2xPP2, {args.dtype}",
            [convert, "--load-dir", str(work / "hf"), "--save-dir", str(work / "legacy"),
             "--params-dtype", args.dtype, "--format", "legacy",
             "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2"],
        ),
        (
            f"mcore2hf.py, {args.max_shard_size} shards, {args.dtype}",
            [export, "--load-dir", str(work / "mcore"), "--save-dir", str(work / "back"),
             "--max-shard-size", args.max_shard_size],
        ),
    ]
    rows = []
    for label, cmd in runs:
        peak_bytes, wall, _ = measure_peak_rss(cmd, env=env)
        peak = peak_bytes / GiB
        rows.append((label, peak, wall))
        print(f"{label}: peak RSS {peak:.2f} GiB, {wall:.0f}s", flush=True)
    print("\n| run | peak RSS | wall |\n| --- | --- | --- |")
    for label, peak, wall in rows:
        print(f"| {label} | {peak:.2f} GiB | {wall:.0f} s |")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
