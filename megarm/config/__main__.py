"""``python -m megarm.config``: print the resolved config or every error (the
config's own checks and those of the files it names, :mod:`megarm.preflight`); a
valid config ends with one line (a YAML comment, so the output still loads): valid,
the layout, the batch sizes, tokens per step and the memory estimate."""

from __future__ import annotations

import argparse
import sys

from megarm.config import ConfigError, markdown_reference, to_yaml
from megarm.preflight import resolve, summary


def main(argv: list[str] | None = None) -> int:
    """``python -m megarm.config``: print the resolved config or every error."""
    parser = argparse.ArgumentParser(
        prog="python -m megarm.config",
        description="Resolve and validate a megarm config without starting anything.",
    )
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--world-size", type=int, default=None, help="number of ranks the run will have")
    parser.add_argument("--markdown", action="store_true", help="print the config reference instead")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown_reference())
        return 0
    try:
        cfg = resolve(args.config, args.overrides, args.world_size)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(to_yaml(cfg), end="")
    print(f"# {summary(cfg, args.world_size)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
