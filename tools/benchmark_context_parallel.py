"""Context parallelism on CPU: activation memory per rank and speed, CP=1 against CP=2.
``python tools/benchmark_context_parallel.py [--lengths 8192 16384] [--iters 3]``

For each sequence length, one pair (two sequences of that length, padded rows) goes
through forward + backward of a small model at CP=1 (one rank) and CP=2 (two ranks),
in this one invocation. Per rank it prints:

- the bytes autograd saves for the backward during the forward (every distinct
  storage a saved tensor points at, counted once: the activation memory the
  estimator models), against :func:`megarm.training.memory.activation_bytes`;
- tokens/s of the steady iterations (the first is left out), over the whole pair.

Activations fall to about 1/CP of CP=1's, plus the gathered K and V; CPU speed says
little about GPUs (CP=2 uses two cores against CP=1's one).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

SHAPE = (
    "model.num_layers=2", "model.hidden_size=128", "model.ffn_hidden_size=512",
    "model.num_attention_heads=4", "model.num_query_groups=2", "model.vocab_size=1024",
    "model.make_vocab_size_divisible_by=128", "model.params_dtype=fp32",
    "training.micro_batch_size=1", "training.global_batch_size=1",
)


def _rank(length: int, cp: int, iters: int) -> dict:
    import torch

    from megarm import distributed
    from megarm.config import load_config
    from megarm.model.builder import build_model
    from megarm.model.step import PairBatch, run_schedule
    from megarm.training.loss import loss_func
    from megarm.training.memory import activation_bytes

    cfg = load_config(None, [*SHAPE, f"data.seq_length={length}",
                             f"model.max_position_embeddings={length}",
                             f"parallel.context_parallel_size={cp}"])
    distributed.init_from_config(cfg)
    rank = torch.distributed.get_rank()
    (model,) = build_model(cfg)
    gen = torch.Generator().manual_seed(0)
    batch = PairBatch(
        tokens=torch.randint(1, 1024, (2, length), generator=gen),
        position_ids=torch.arange(length).expand(2, length).contiguous(),
        reward_index=torch.tensor([length - 1, length - 1]),
        margin=torch.zeros(1),
    )
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    times = []
    for i in range(iters):
        model.zero_grad()
        start = time.perf_counter()
        if i == 0:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                run_schedule([model], [batch], loss_func, forward_only=False)
        else:
            run_schedule([model], [batch], loss_func, forward_only=False)
        times.append(time.perf_counter() - start)
    steady = times[1:] or times
    return {
        "length": length,
        "cp": cp,
        "rank": rank,
        "saved_activation_mib": sum(saved.values()) / 2**20,
        "estimated_activation_mib": activation_bytes(cfg, cuda=False, world_size=cp) / 2**20,
        "tokens_per_s": 2 * length / (sum(steady) / len(steady)),
    }


def _is_rank_zero() -> bool:
    import torch

    return torch.distributed.get_rank() == 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: every case under its own torchrun launch (``--case``: one rank's part)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--iters", type=int, default=3, help="iterations per case (first left out)")
    parser.add_argument("--case", type=int, nargs=2, metavar=("LENGTH", "CP"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        from megarm.distributed import all_gather_objects

        rows = all_gather_objects(_rank(args.case[0], args.case[1], args.iters))
        if rows[0]["rank"] == 0 and _is_rank_zero():
            for row in rows:
                print(json.dumps({k: round(v, 1) if isinstance(v, float) else v
                                  for k, v in row.items()}), flush=True)
        return 0
    import socket
    import subprocess

    for length in args.lengths:
        for cp in (1, 2):
            with socket.socket() as sock:  # a free port for this launch's rendezvous
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(cp),
                   "--master_port", str(port), __file__, "--case", str(length), str(cp),
                   "--iters", str(args.iters)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                print(done.stderr[-3000:], file=sys.stderr)
                return done.returncode
            print("\n".join(x for x in done.stdout.splitlines() if x.startswith("{")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
