"""Check a checkpoint without loading it into a model:
``python -m megarm.checkpoint verify DIR [--iteration N] [--size-only]``.

Resolves DIR (a save root, an ``iter_*`` directory or a converted checkpoint),
compares every file with the integrity manifest written at save (sizes and xxh3
checksums), parses the pickled parts with megarm's restricted unpicklers, and
prints what the checkpoint holds. Exit status 0 when intact, 2 otherwise.
"""

from __future__ import annotations

import argparse
import sys

from megarm import platform

platform.quiet_expected_warnings()  # before megatron-core is imported below

from megarm.checkpoint.integrity import CheckpointCorruptError, read_manifest  # noqa: E402
from megarm.checkpoint.layout import CheckpointNotFoundError  # noqa: E402
from megarm.checkpoint.load import open_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m megarm.checkpoint", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="check a checkpoint's files and pickles")
    verify.add_argument("directory", help="save root, iter_* directory or converted checkpoint")
    verify.add_argument("--iteration", type=int, default=None, help="iteration (default: the tracker's)")
    verify.add_argument("--size-only", action="store_true", help="compare sizes, skip checksums")
    verify.add_argument(
        "--allow-unverified",
        action="store_true",
        help="accept a checkpoint without an integrity manifest (another tool wrote it): "
        "only its pickles are checked",
    )
    args = parser.parse_args(argv)
    try:
        opened = open_checkpoint(args.directory, args.iteration, "size" if args.size_only else "checksum")
    except (CheckpointNotFoundError, CheckpointCorruptError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    files = read_manifest(opened.path) or {}
    if not files and not args.allow_unverified:
        print(
            f"error: {opened.path} has no integrity manifest (megarm_integrity.json): its "
            "files cannot be checked. Every megarm checkpoint has one; a missing one means "
            "damage or another tool. Pass --allow-unverified to check only its pickles",
            file=sys.stderr,
        )
        return 2
    common = opened.common
    layout = common.get("checkpoint_layout")
    print(
        f"{opened.path}: intact ({len(files)} files, {sum(f['size'] for f in files.values()) / 1e9:.2f} GB"
        f"{', sizes only' if args.size_only else ', checksums match'}); iteration "
        f"{common.get('iteration')}, consumed samples {common.get('consumed_samples')}, "
        f"optimizer state {'yes' if common.get('has_optimizer') else 'no'}"
        + (f", saved at PP x TP x DP = {' x '.join(map(str, layout))}" if layout else "")
    )
    if not files:
        print("note: no integrity manifest (an older megarm or another tool wrote it): "
              "only the pickles were checked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
