"""What a run records beside its weights, read and written in one place.

A megarm checkpoint's ``common.pt`` holds the saved config (``megarm_config``) and
where the reward is read (:data:`CONVENTION_KEY`); ``reward_stats.json``
(:data:`REWARD_STATS_FILE`, written by ``megarm.reward_stats`` and after training)
holds the reward statistics; an HF export holds both in its ``config.json``.
Everything else asks this module.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megarm.checkpoint.layout import resolve_checkpoint
from megarm.checkpoint.load import read_common
from megarm.errors import ScoringError

TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
# Written next to a checkpoint's weights by megarm.reward_stats (and after training).
REWARD_STATS_FILE = "reward_stats.json"
# Common-state key of a megarm checkpoint that records where the reward is read.
CONVENTION_KEY = "reward_convention"


@dataclass
class RewardInfo:
    """What a checkpoint or export records about its reward."""

    convention: dict[str, Any] | None = None
    """:func:`~megarm.data.templates.reward_convention` recorded at training or export."""
    mean: float | None = None
    """Mean reward over the validation split (:mod:`megarm.reward_stats`)."""
    std: float | None = None
    """Standard deviation of the same rewards."""

    def normalize(self, rewards: list[float]) -> list[float]:
        """``(r - mean) / std`` as OpenRLHF's ``--normalize_reward`` applies them."""
        if self.mean is None or self.std is None:
            raise ScoringError(
                "normalisation asked for, but the model has no reward statistics; compute "
                "them with python -m megarm.reward_stats --load ... --write"
            )
        if not (isinstance(self.mean, (int, float)) and math.isfinite(self.mean)) or not (
            isinstance(self.std, (int, float)) and math.isfinite(self.std) and self.std > 0
        ):
            raise ScoringError(
                f"the model's reward statistics are unusable (mean {self.mean!r}, std "
                f"{self.std!r}: both must be finite numbers and std > 0); recompute them with "
                "python -m megarm.reward_stats --load ... --write"
            )
        return [(r - self.mean) / self.std for r in rewards]


def is_hf_export(path: str | Path) -> bool:
    """Whether ``path`` is an HF model directory (config.json + safetensors weights)
    rather than a megarm checkpoint."""
    root = Path(path)
    weights = (root / "model.safetensors").is_file() or (
        root / "model.safetensors.index.json"
    ).is_file()
    return (root / "config.json").is_file() and weights and not (root / "metadata.json").is_file()


def checkpoint_common(load: str | Path, iteration: int | None = None) -> tuple[Path, dict]:
    """A megarm checkpoint's directory and common state (``{}`` when it has none)."""
    try:
        path = resolve_checkpoint(load, iteration)
    except (FileNotFoundError, ValueError) as exc:
        raise ScoringError(str(exc)) from exc
    common = read_common(path) if (path / "common.pt").is_file() else {}
    return path, common


def read_reward_stats(directory: Path) -> dict[str, Any] | None:
    """The reward statistics written next to a checkpoint's weights, if any."""
    path = directory / REWARD_STATS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise ScoringError(f"{path} is not valid JSON ({exc}); recompute it") from exc
    return data if isinstance(data, dict) else None


def reward_info(load: str | Path, iteration: int | None = None) -> RewardInfo:
    """The convention and statistics an export's config.json or a checkpoint records."""
    if is_hf_export(load):
        config = json.loads((Path(load) / "config.json").read_text())
        return RewardInfo(config.get(CONVENTION_KEY), config.get("mean"), config.get("std"))
    path, common = checkpoint_common(load, iteration)
    stats = read_reward_stats(path) or {}
    return RewardInfo(common.get(CONVENTION_KEY), stats.get("mean"), stats.get("std"))


def tokenizer_dir(load: str | Path, given: str | None, common: dict | None = None) -> str:
    """``--tokenizer-name-or-path``, else the tokenizer files in ``--load``, else the
    tokenizer a training run named in its saved config."""
    if given:
        return given
    if any((Path(load) / name).is_file() for name in TOKENIZER_MARKERS):
        return str(load)
    saved = ((common or {}).get("megarm_config") or {}).get("data") or {}
    if saved.get("tokenizer_name_or_path") and Path(saved["tokenizer_name_or_path"]).exists():
        return str(saved["tokenizer_name_or_path"])
    raise ScoringError(
        f"{load} holds no tokenizer files; pass --tokenizer-name-or-path (or convert with "
        "ckpt_convert/hf2mcore.py --tokenizer-model DIR, which copies them)"
    )


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
