"""Reward statistics: the mean and std of a model's rewards over a validation set,
stored with the model so that RLHF frameworks can normalise its rewards.

    torchrun --nproc_per_node N -m megarm.reward_stats --load CKPT_OR_EXPORT \\
        [--data PREFIX [--split 98,2,0] | --pairs FILE [--handler-name NAME]] [--write]

The rewards are the chosen and the rejected reward of every pair, pooled (as
OpenRLHF computes ``config.mean``/``config.std`` after training); the std is the
unbiased one, clamped at 1e-8. By default the pairs are the validation split of the
data the checkpoint was trained on (its saved ``data.data_path`` and ``data.split``).
``--write`` stores them: a checkpoint gets ``reward_stats.json`` beside its weights
(which ``ckpt_convert/mcore2hf.py`` copies into the export's config.json), an export
gets ``mean``/``std`` in its config.json. Training writes them into its last
checkpoint when it ends (:func:`megarm.rewards.stats.after_training`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megarm import cli
from megarm.checkpoint.metadata import (
    checkpoint_common,
    is_hf_export,
    write_checkpoint_stats,
    write_export_stats,
)
from megarm.data.dataset import build_pair_datasets
from megarm.data.handlers import get_handler
from megarm.data.readers import InputError, iter_records, resolve_inputs
from megarm.errors import ScoringError
from megarm.rewards.backends import open_scorer
from megarm.rewards.stats import dataset_rows, summarize

# The default split when neither the checkpoint nor --split names one (training's).
DEFAULT_SPLIT = "98,2,0"


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="python -m megarm.reward_stats", description=__doc__.split("\n")[0]
    )
    cli.add_model_arguments(p)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--data", help="preprocessed prefix (default: the checkpoint's own data)")
    source.add_argument("--pairs", help="raw preference records (any preprocessing handler)")
    p.add_argument("--split", help="train,valid,test weights of --data (default: the run's)")
    p.add_argument("--handler-name", default="pairwise_messages", help="format of --pairs")
    p.add_argument("--write", action="store_true", help="store the statistics with the model")
    return p


def _rows(args: argparse.Namespace, encoder: Any) -> tuple[list[list[int]], str]:
    if args.pairs:
        try:
            records = list(iter_records(resolve_inputs(args.pairs)))
        except InputError as exc:
            raise ScoringError(str(exc)) from exc
        handler = get_handler(args.handler_name)
        rows = []
        for _, result in encoder.pairs(records, handler):
            if result[0] == "ok":
                prompt, chosen, rejected = result[1:4]
                rows += [prompt.tolist() + chosen.tolist(), prompt.tolist() + rejected.tolist()]
        return rows, f"pairs in {args.pairs}"
    saved = {}
    if not is_hf_export(args.load):
        saved = (checkpoint_common(args.load, args.iteration)[1].get("megarm_config") or {}).get(
            "data"
        ) or {}
    data = args.data or saved.get("data_path")
    if not data:
        raise ScoringError(
            f"{args.load} names no training data; pass --data PREFIX or --pairs FILE"
        )
    split = args.split or saved.get("split") or DEFAULT_SPLIT
    try:
        _, valid, _ = build_pair_datasets(data, split)
    except (FileNotFoundError, ValueError) as exc:
        raise ScoringError(f"--data {data}: {exc}") from exc
    if valid is None:
        raise ScoringError(
            f"--data {data} with split {split} has no validation pairs; pass --split"
        )
    return dataset_rows(valid), f"validation split ({split}) of {data}"


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """Compute (and with ``--write`` store) the statistics; rank 0 returns them."""
    scorer, encoder, _ = open_scorer(cli.scorer_spec(args))
    with scorer:
        if not scorer.is_driver:
            scorer.follow()
            return None
        rows, source = _rows(args, encoder)
        stats = summarize(scorer.rewards(rows), source)
    print(json.dumps(stats), flush=True)
    if args.write:
        if is_hf_export(args.load):
            where = write_export_stats(Path(args.load), stats)
        else:
            where = write_checkpoint_stats(checkpoint_common(args.load, args.iteration)[0], stats)
        print(f"wrote {where}", flush=True)
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a bad input)."""
    return cli.run_command(build_parser(), run, argv, (ScoringError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
