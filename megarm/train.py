"""Train a reward model: ``torchrun --nproc_per_node N -m megarm.train --config X.yaml key=value ...``

The config is resolved and validated (for the world size torchrun gives) before
any process group or model exists. A bad config is printed by rank 0 only; every
rank exits with status 2. examples/rm/*.sh wrap this with torchrun, one node or
many, and check the config once before any process starts.
"""

from __future__ import annotations

import argparse
import os
import sys

from megarm.config import ConfigError, MegarmConfig
from megarm.preflight import resolve


def build_parser() -> argparse.ArgumentParser:
    """megarm.train's command line (the launchers parse theirs with it too)."""
    parser = argparse.ArgumentParser(
        prog="python -m megarm.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every key: docs/config.md, or python -m megarm.config --markdown.",
    )
    parser.add_argument("--config", help="YAML config (defaults: a tiny model on synthetic pairs)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[MegarmConfig, argparse.Namespace]:
    """Command line -> validated config."""
    from megarm.distributed import world_size_from_environ

    args = build_parser().parse_args(argv)
    return resolve(args.config, args.overrides, world_size_from_environ()), args


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    try:
        cfg, _ = parse_args(argv)
    except ConfigError as exc:
        # Every rank finds the same problems: one copy is enough.
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {exc}", file=sys.stderr)
        return 2

    from megarm import distributed
    from megarm.training.loop import Trainer

    p = cfg.parallel
    with distributed.distributed_from_config(cfg) as launch:
        trainer = Trainer(cfg)
        if launch.rank == 0:
            from megarm import platform
            from megarm.training.memory import estimate

            print(estimate(cfg, launch.world_size, platform.is_cuda(),
                           fused_adam=platform.has_fused_adam()).summary(), flush=True)
            print(
                f"megarm: world {launch.world_size} = TP {p.tensor_model_parallel_size} x "
                f"PP {p.pipeline_model_parallel_size} x DP {trainer.dp_size}; "
                f"{trainer.num_microbatches} micro-batch(es) of {cfg.training.micro_batch_size} "
                f"{'pair' if cfg.training.objective in ('rm', 'joint') else 'record'}(s) per step; "
                f"{trainer.num_parameters:,} parameters on rank 0",
                flush=True,
            )
        try:
            trainer.train()
        finally:
            trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
