"""Estimate the memory of a run before launching it:
``python tools/estimate_memory.py --config X.yaml --world-size N [--gpu-memory-gib 80] [--cpu] [key=value ...]``

Prints, per GPU (per process with ``--cpu``): weights, gradients, optimizer state
(with and without the distributed optimizer), activations, optimizer-step
temporaries, the peak of an iteration and of a checkpoint save (host and device
separately on GPU), and the largest micro-batch that fits the given GPU memory.
Formulas and measured constants: megarm/training/memory.py. Imports no torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    from megarm.config import ConfigError
    from megarm.preflight import resolve
    from megarm.training.memory import GIB, estimate, largest_micro_batch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config")
    parser.add_argument("--world-size", type=int, required=True, help="GPUs in the run")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU")
    parser.add_argument("--cpu", action="store_true", help="estimate the CPU (fp32) run instead")
    parser.add_argument("--unfused-adam", dest="fused_adam", action="store_false",
                        help="torch's unfused AdamW steps the parameters (a torch without its "
                             "fused kernel for the device); default: a fused Adam, "
                             "transformer-engine's, apex's or torch's, which megarm selects")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        # Sizing a run needs no data or weights: a real-size config may leave them null.
        sizing = ["data.allow_synthetic=true", "checkpoint.allow_random_init=true"]
        cfg = resolve(args.config, [*sizing, *args.overrides], args.world_size)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    cuda = not args.cpu
    est = estimate(cfg, args.world_size, cuda, fused_adam=args.fused_adam)
    other = dataclasses.replace(
        cfg, parallel=dataclasses.replace(
            cfg.parallel, use_distributed_optimizer=not cfg.parallel.use_distributed_optimizer
        )
    )
    alt = estimate(other, args.world_size, cuda, fused_adam=args.fused_adam)
    fits = largest_micro_batch(cfg, args.world_size, args.gpu_memory_gib, cuda, args.fused_adam)
    if args.json:
        print(json.dumps({"estimate": est.to_dict(), "other_optimizer": alt.to_dict(),
                          "largest_micro_batch": fits}))
        return 0
    with_d, without = (est, alt) if cfg.parallel.use_distributed_optimizer else (alt, est)
    where = "GPU" if cuda else "process"
    rows = [
        (f"parameters per {where}", f"{est.parameters / 1e6:,.1f} M"),
        ("weights", f"{est.weights / GIB:.2f} GiB"),
        ("gradients (fp32)", f"{est.gradients / GIB:.2f} GiB"),
        ("optimizer, distributed", f"{with_d.optimizer / GIB:.2f} GiB"),
        ("optimizer, not distributed", f"{without.optimizer / GIB:.2f} GiB"),
        ("activations", f"{est.activations / GIB:.2f} GiB ({est.stream_tokens:,} tokens "
                        "per micro-batch)"),
        ("optimizer-step temporaries", f"{est.step_transients / GIB:.2f} GiB "
                                       f"({'fused Adam' if args.fused_adam else 'unfused torch AdamW'})"),
    ]
    if cuda:
        rows += [
            ("peak per GPU, training", f"{est.training_peak / GIB:.2f} GiB"),
            ("peak per GPU, saving", f"{est.save_peak / GIB:.2f} GiB (nothing added)"),
            ("host memory a save adds", f"{est.save_extra_host / GIB:.2f} GiB"),
            (f"largest micro-batch in {args.gpu_memory_gib:g} GiB", f"{fits} pairs"),
        ]
    else:
        rows += [
            ("libraries of the process", f"{est.runtime / GIB:.2f} GiB"),
            ("peak per process, training", f"{est.training_peak / GIB:.2f} GiB"),
            ("peak per process, saving", f"{est.save_peak / GIB:.2f} GiB"),
        ]
    for name, value in rows:
        print(f"{name:<34} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
