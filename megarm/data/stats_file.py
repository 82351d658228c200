"""``<prefix>_stats.json``: what preprocessing records beside a prefix's files.

Counts, lengths, the tokenizer's fingerprint and pad id, the chat template and
its reward convention, the arguments, and the list of files the prefix owns.
Preprocessing writes it last (so a prefix holds exactly what it lists); every
reader asks this module. No torch: ``python -m megarm.config`` reads it too.
"""

from __future__ import annotations

import json
import os
from typing import Any

RERUN = "re-run tools/preprocess_data.py --overwrite for this prefix"


class DataFileError(ValueError):
    """A packed file is damaged or belongs to another dataset; the message names it."""


def stats_path(prefix: str) -> str:
    """``<prefix>_stats.json``: counts, lengths, tokenizer fingerprint, arguments."""
    return f"{prefix}_stats.json"


def read_stats(prefix: str) -> dict[str, Any] | None:
    """``<prefix>_stats.json`` as a dict, or ``None`` when there is none."""
    path = stats_path(prefix)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            stats = json.load(handle)
    except (OSError, ValueError) as exc:
        raise DataFileError(f"{path} is not readable JSON ({exc}); {RERUN}") from exc
    if not isinstance(stats, dict):
        raise DataFileError(f"{path} must hold a JSON object; {RERUN}")
    return stats


def reward_convention(prefix: str) -> dict[str, Any] | None:
    """Where the reward is read, as preprocessing recorded it for ``prefix``."""
    return ((read_stats(prefix) or {}).get("template") or {}).get("reward_convention") or None


def recorded_pad_id(prefix: str) -> int | None:
    """The pad id of the tokenizer ``prefix`` was written with, if recorded."""
    value = ((read_stats(prefix) or {}).get("tokenizer") or {}).get("pad_token_id")
    return None if value is None else int(value)
