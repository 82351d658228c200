"""Peak host memory of every rank while training and while saving a checkpoint:
``torchrun --nproc_per_node N tools/benchmark_save_memory.py --config X.yaml [key=value ...]``

Trains ``training.train_iters`` iterations, then saves once, and prints one JSON
line per rank: its peak resident memory (Linux VmHWM) over the training
iterations, the peak during the save alone (VmHWM is reset just before it, by
writing 5 to /proc/self/clear_refs), the save's wall time, and the estimate.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _vm_hwm() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config")
    parser.add_argument("--label", default="", help="free text copied into the JSON lines")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    from megarm.config import ConfigError
    from megarm.distributed import world_size_from_environ
    from megarm.preflight import resolve

    try:
        cfg = resolve(args.config, [*args.overrides, "training.eval_interval=0"], world_size_from_environ())
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    if not cfg.checkpoint.save:
        print("error: set checkpoint.save (the save is what is measured)", file=sys.stderr)
        return 2

    from megarm import distributed, platform
    from megarm.training.loop import Trainer
    from megarm.training.memory import estimate

    with distributed.distributed_from_config(cfg) as env:
        cfg.checkpoint.save_interval = None
        trainer = Trainer(cfg)
        trainer.evaluate = lambda: None  # type: ignore[method-assign]
        save = trainer.save
        timing: dict[str, float] = {}

        def measured_save() -> None:
            timing["before"] = _vm_hwm()
            # Printed now: a save that is killed (out of memory) still leaves this.
            print(json.dumps({"rank": env.rank, "peak_training_gib": timing["before"] / 2**30}), flush=True)
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # reset VmHWM to the current RSS
            start = time.perf_counter()
            save()
            timing["seconds"] = time.perf_counter() - start
            timing["after"] = _vm_hwm()

        trainer.save = measured_save  # type: ignore[method-assign]
        trainer.train()
        if "before" not in timing:
            measured_save()
        est = estimate(cfg, env.world_size, platform.is_cuda(), fused_adam=platform.has_fused_adam())
        row = {
            "label": args.label,
            "rank": env.rank,
            "world_size": env.world_size,
            "distributed_optimizer": cfg.parallel.use_distributed_optimizer,
            "params_dtype": str(trainer.model[0].config.params_dtype).replace("torch.", ""),
            "peak_training_gib": timing["before"] / 2**30,
            "peak_during_save_gib": timing["after"] / 2**30,
            "save_seconds": timing["seconds"],
            "estimate": est.to_dict(),
        }
        print(json.dumps(row), flush=True)
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
