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
checkpoint when it ends (:func:`after_training`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from megarm import distributed
from megarm.checkpoint import resolve_checkpoint
from megarm.config import MegarmConfig
from megarm.data.blend import parse_data_path
from megarm.data.dataset import build_pair_datasets
from megarm.data.handlers import get_handler
from megarm.data.readers import InputError, iter_records, resolve_inputs
from megarm.scoring import (
    REWARD_STATS_FILE,
    ScoringError,
    add_model_arguments,
    checkpoint_common,
    entry_point,
    is_hf_export,
    mean_std,
    model_rewards,
    open_scorer,
)

# The default split when neither the checkpoint nor --split names one (training's).
DEFAULT_SPLIT = "98,2,0"


def data_convention(data_path: str | None) -> dict[str, Any] | None:
    """The reward convention recorded in the stats.json of ``data_path``'s first
    prefix (``None`` for synthetic data or data preprocessed before it was recorded)."""
    if not data_path:
        return None
    stats = Path(parse_data_path(data_path)[0][1] + "_stats.json")
    if not stats.is_file():
        return None
    return ((json.loads(stats.read_text()).get("template") or {}).get("reward_convention")) or None


def summarize(rewards: Sequence[float], source: str) -> dict[str, Any]:
    """The stored record: mean, std, how many rewards, and from what."""
    mean, std = mean_std(rewards)
    return {"mean": mean, "std": std, "count": len(rewards), "source": source}


def dataset_rows(dataset: Any) -> list[list[int]]:
    """Every pair's chosen and rejected token row of a preprocessed split."""
    rows = []
    for i in range(len(dataset)):
        sample = dataset[i]
        rows += [sample["chosen_input_ids"].tolist(), sample["rejected_input_ids"].tolist()]
    return rows


def write_checkpoint_stats(checkpoint: Path, stats: dict[str, Any]) -> Path:
    """Store ``stats`` as ``reward_stats.json`` beside a checkpoint's weights."""
    path = checkpoint / REWARD_STATS_FILE
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(stats, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def write_export_stats(export: Path, stats: dict[str, Any]) -> Path:
    """Set ``mean``/``std`` in an HF export's config.json (where OpenRLHF reads them)."""
    path = export / "config.json"
    config = json.loads(path.read_text())
    config.update(mean=stats["mean"], std=stats["std"])
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def after_training(
    model: list[torch.nn.Module], valid: Any, pad_id: int, cfg: MegarmConfig
) -> dict[str, Any] | None:
    """At the end of training (every rank): the reward statistics over the validation
    split, written into the last checkpoint; ``None`` without a split or a save dir."""
    if valid is None or len(valid) == 0 or not cfg.checkpoint.save:
        return None
    rewards = model_rewards(model, dataset_rows(valid), pad_id)
    stats = summarize(rewards, f"validation split of {cfg.data.data_path or 'synthetic pairs'}")
    if distributed.LaunchEnv.from_environ().rank == 0:
        path = write_checkpoint_stats(resolve_checkpoint(cfg.checkpoint.save), stats)
        print(f"reward mean {stats['mean']:.4f}, std {stats['std']:.4f} -> {path}", flush=True)
    distributed.barrier()
    return stats


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="python -m megarm.reward_stats", description=__doc__.split("\n")[0]
    )
    add_model_arguments(p)
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
    scorer, encoder, _ = open_scorer(args)
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
    return entry_point(build_parser(), run, argv, (ScoringError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
