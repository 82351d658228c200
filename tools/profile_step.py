"""Where a training step's time goes, by phase, from wall timers inside the loop:
``torchrun --nproc_per_node 1 tools/profile_step.py [--config X.yaml] [key=value ...] [--warmup 5]``

Phases (median ms over the iterations after ``--warmup``): ``zero`` (the DDP grad
buffers and the optimizer's grads), ``forward_backward`` (megatron-core's schedule:
forward, loss, backward and the gradient reduction, with the DDP's NaN check where
it is on), ``grad_norm``, ``clip``, ``adam`` (the update, copying back to the model
params) and ``step`` (the whole iteration). The timers wrap methods the loop calls
through the optimizer object and megatron-core's clip function, so the same script
times older checkouts too (``PYTHONPATH=<checkout>``). One JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config")
    parser.add_argument("--warmup", type=int, default=5, help="iterations left out")
    parser.add_argument("--label", default="", help="free text copied into the JSON line")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    from megarm.config import ConfigError
    from megarm.distributed import world_size_from_environ
    from megarm.preflight import resolve

    overrides = [*args.overrides, "training.eval_interval=0", "checkpoint.save=null",
                 "checkpoint.save_interval=null", "logging.log_dir=null"]
    try:
        cfg = resolve(args.config, overrides, world_size_from_environ())
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2

    import megatron.core.optimizer.optimizer as mcore_optimizer

    from megarm import distributed, platform
    from megarm.training import loop
    from megarm.training import optimizer as megarm_optimizer

    times: dict[str, list[float]] = defaultdict(list)

    def timed(name, fn):  # noqa: ANN001, ANN202 - wraps any callable
        def wrapper(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            platform.synchronize()
            start = time.perf_counter()
            out = fn(*a, **kw)
            platform.synchronize()
            times[name].append(time.perf_counter() - start)
            return out
        return wrapper

    for module in (mcore_optimizer, megarm_optimizer):
        if hasattr(module, "clip_grad_by_total_norm_fp32"):
            module.clip_grad_by_total_norm_fp32 = timed("clip", module.clip_grad_by_total_norm_fp32)
    with distributed.distributed_from_config(cfg) as env:
        trainer = loop.Trainer(cfg)
        trainer.evaluate = lambda: None  # type: ignore[method-assign]
        opt = trainer.optimizer
        opt.get_grad_norm = timed("grad_norm", opt.get_grad_norm)
        opt.step_with_ready_grads = timed("adam", opt.step_with_ready_grads)
        opt.zero_grad = timed("zero", opt.zero_grad)
        for chunk in trainer.model:
            chunk.zero_grad_buffer = timed("zero", chunk.zero_grad_buffer)
        trainer.run_schedule = timed("forward_backward", trainer.run_schedule)
        trainer.train()
        steps = len(trainer.history)
        result: dict[str, object] = {"label": args.label, "iterations_timed": steps - args.warmup}
        for name, values in times.items():
            per_step = len(values) // steps  # zero: one call per chunk plus the optimizer's
            merged = [sum(values[i * per_step:(i + 1) * per_step]) for i in range(steps)]
            result[f"{name}_ms"] = 1000 * statistics.median(merged[args.warmup:])
        result["step_ms"] = 1000 * statistics.median(
            h["iteration_time"] for h in trainer.history[args.warmup:])
        if env.rank == 0:
            print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
