"""Measure training speed of any config:
``torchrun --nproc_per_node N tools/benchmark_train.py --config X.yaml [key=value ...] [--warmup 3]``

Runs ``training.train_iters`` iterations (evaluation and checkpointing off) and
prints one JSON line: real (non-pad) tokens/s, pairs/s, mean iteration time, the
mean real tokens of a micro-batch (its stream when packed), peak device memory
allocated and reserved (the allocator's cache included) against the estimate, and on GPU TFLOP/s per device and MFU (formula in
megarm/training/flops.py; no vocabulary-logits term).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config")
    parser.add_argument("--warmup", type=int, default=3, help="iterations left out of the means")
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
    if cfg.training.train_iters <= args.warmup:
        print("error: training.train_iters must exceed --warmup", file=sys.stderr)
        return 2

    import torch

    from megarm import distributed, platform
    from megarm.training.flops import peak_tflops, training_flops
    from megarm.training.loop import Trainer
    from megarm.training.memory import estimate

    p = cfg.parallel
    with distributed.distributed_from_config(cfg) as env:
        trainer = Trainer(cfg)
        trainer.evaluate = lambda: None  # type: ignore[method-assign]
        trainer.train()
        timed = trainer.history[args.warmup:]
        seconds = sum(h["iteration_time"] for h in timed)
        tokens = sum(h["tokens"] for h in timed)
        flops = sum(training_flops(cfg, h["tokens"], h["tokens_sq"]) for h in timed)
        peak_mem, peak_reserved = distributed.all_reduce_host(
            torch.tensor([float(platform.max_memory_allocated()),
                          float(platform.max_memory_reserved())]), "max"
        ).tolist()
        est = estimate(cfg, env.world_size, platform.is_cuda(), fused_adam=platform.has_fused_adam())
        streams = len(timed) * trainer.num_microbatches * trainer.dp_size
        result = {
            "label": args.label,
            "world_size": env.world_size,
            "tp": p.tensor_model_parallel_size,
            "pp": p.pipeline_model_parallel_size,
            "dp": trainer.dp_size,
            "device": torch.cuda.get_device_name() if platform.is_cuda() else "cpu",
            "params_dtype": str(trainer.model[0].config.params_dtype).replace("torch.", ""),
            "iterations_timed": len(timed),
            "tokens_per_s": tokens / seconds,
            "pairs_per_s": sum(h["pairs"] for h in timed) / seconds,
            "iteration_time_s": statistics.mean(h["iteration_time"] for h in timed),
            # steady state on a shared machine: the median step, and the model FLOPs of
            # a mean step (megarm/training/flops.py) for an MFU against a measured rate
            "iteration_time_median_s": statistics.median(h["iteration_time"] for h in timed),
            "model_flops_per_iteration": flops / len(timed),
            # real tokens of a micro-batch (its THD stream when packed), measured; and the
            # stream the memory estimate was sized for (from the data's length statistics)
            "stream_tokens": tokens / streams,
            "estimate_stream_tokens": est.stream_tokens,
            "peak_memory_gib": peak_mem / 2**30,
            "peak_reserved_gib": peak_reserved / 2**30,
            "estimate_gib": est.training_peak / 2**30,
            "parameters": trainer.num_parameters,
            "tflops_per_device": flops / seconds / env.world_size / 1e12,
        }
        peak = peak_tflops(result["device"]) if platform.is_cuda() else None
        result["mfu"] = result["tflops_per_device"] / peak if peak else None
        if env.rank == 0:
            print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
