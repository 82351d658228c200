"""Parse ``data_path`` blends and check prefixes, without importing torch.

The config validator calls this before any process starts, so it only looks at
file names: ``<prefix>_packed_<key>_document.{bin,idx}`` (MindSpeed-RL's layout).
A prefix's files are the ones its ``<prefix>_stats.json`` lists (a finished
preprocessing run owns exactly those); only without stats.json (data from another
tool) are they found by glob, with a warning.
"""

from __future__ import annotations

import glob
import json
import re
import warnings
from pathlib import Path

from megarm.data.stats_file import stats_path

REQUIRED_KEYS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
# SFT records (tools/preprocess_data.py --handler-name sft): one sequence each.
SFT_KEYS = ("input_ids", "labels")
# Ranked records (--handler-name ranked / ultrafeedback_ranked): one document of K
# sequences per record in the first two, its K scores (float32) in the third.
RANKED_KEYS = ("ranked_input_ids", "ranked_labels", "scores")
# Regression records (--handler-name regression / helpsteer2): one sequence each, and
# one document of num_labels float32 targets (NaN: missing).
REGRESSION_KEYS = ("input_ids", "labels", "targets")
# Step-labelled records (--handler-name prm_steps / math_shepherd): one sequence
# each, the step-end marker positions in it (int32) and one float32 label per position.
PRM_KEYS = ("input_ids", "labels", "step_positions", "step_targets")
PACKED_RE = re.compile(r"_packed_(.*)_document(.*)$")


def parse_data_path(data_path: str | list[str]) -> list[tuple[float, str]]:
    """``"0.7 A 0.3 B"`` / ``"A"`` / ``["0.7", "A", ...]`` -> normalised (weight, prefix) pairs."""
    tokens = data_path.split() if isinstance(data_path, str) else [str(x) for x in data_path]
    if not tokens:
        raise ValueError("data_path is empty; give a prefix or 'w1 prefix1 w2 prefix2'")
    if len(tokens) == 1:
        return [(1.0, tokens[0])]
    if len(tokens) % 2:
        raise ValueError(
            f"a blend needs weight/prefix pairs, got {len(tokens)} items: {' '.join(tokens)}"
        )
    pairs = []
    for weight, prefix in zip(tokens[::2], tokens[1::2]):
        try:
            w = float(weight)
        except ValueError:
            raise ValueError(f"blend weight {weight!r} (before {prefix}) is not a number") from None
        if w <= 0:
            raise ValueError(f"blend weight for {prefix} must be > 0, got {w}")
        pairs.append((w, prefix))
    total = sum(w for w, _ in pairs)
    return [(w / total, prefix) for w, prefix in pairs]


def listed_files(prefix: str) -> list[str] | None:
    """The file names ``<prefix>_stats.json`` lists, or ``None`` without a stats.json
    (or one from a version that did not list them). Raises ``ValueError`` for a
    stats.json that is not valid JSON."""
    path = Path(stats_path(prefix))
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text(encoding="utf-8")).get("files")
    except (ValueError, AttributeError) as exc:
        raise ValueError(f"{path} is not a valid stats.json ({exc}); re-run "
                         "tools/preprocess_data.py --overwrite for this prefix") from exc
    return [str(name) for name in files] if isinstance(files, list) else None


def packed_files(prefix: str) -> dict[str, str]:
    """Map each packed key (``chosen_input_ids``, ..., ``margin``) to its file path
    without extension: the ``.idx`` files stats.json lists, else (no stats.json) every
    one found by glob, with a warning that stale files would be read too."""
    found: dict[str, str] = {}
    names = listed_files(prefix)
    if names is not None:
        parent = Path(prefix).parent
        stems = [str(parent / name)[: -len(".idx")] for name in names if name.endswith(".idx")]
    else:
        stems = [p[: -len(".idx")] for p in glob.glob(glob.escape(prefix) + "_packed_*_document*.idx")]
        if stems:
            warnings.warn(
                f"{prefix}_stats.json is missing: reading every {prefix}_packed_*_document "
                "file found, including any left by an earlier run",
                stacklevel=2,
            )
    for stem in sorted(stems):
        match = PACKED_RE.search(stem[len(prefix):])
        if stem.startswith(prefix) and match:
            found[match.group(1)] = stem
    return found


def prefix_problems(prefix: str) -> list[str]:
    """Messages for a prefix whose packed files are missing or incomplete."""
    try:
        files = packed_files(prefix)
    except ValueError as exc:
        return [str(exc)]
    if not files:
        parent = Path(prefix).parent
        hint = "" if parent.is_dir() else f" (directory {parent} does not exist)"
        return [
            f"no files {prefix}_packed_*_document.idx{hint}; "
            "create them with tools/preprocess_data.py --output-prefix"
        ]
    problems = []
    for key in required_keys(files):
        if key not in files:
            problems.append(f"{prefix}: missing {prefix}_packed_{key}_document.idx")
    for stem in files.values():  # stats.json may list files that are gone
        problems += [f"{prefix}: missing {stem}{ext}" for ext in (".idx", ".bin")
                     if not Path(stem + ext).is_file()]
    return problems


def files_kind(files: dict[str, str]) -> str:
    """``"ranked"``, ``"regression"``, ``"sft"`` or ``"pairs"``: what a prefix's
    packed keys hold."""
    if "ranked_input_ids" in files or "scores" in files:
        return "ranked"
    if "targets" in files:
        return "regression"
    if "step_targets" in files or "step_positions" in files:
        return "prm"
    return "sft" if "input_ids" in files else "pairs"


def required_keys(files: dict[str, str]) -> tuple[str, ...]:
    """The packed keys a prefix of this kind must have."""
    kinds = {"ranked": RANKED_KEYS, "regression": REGRESSION_KEYS, "sft": SFT_KEYS,
             "prm": PRM_KEYS}
    return kinds.get(files_kind(files), REQUIRED_KEYS)


def data_kind(prefix: str) -> str | None:
    """``"sft"`` (SFT records), ``"pairs"`` (preference pairs, critique pairs
    included), ``"ranked"`` (K scored responses per prompt), ``"regression"``
    (responses with attribute labels), ``"prm"`` (step-labelled solutions) or ``None`` when the prefix has no packed
    files."""
    try:
        with warnings.catch_warnings():  # packed_files already warns where it matters
            warnings.simplefilter("ignore")
            files = packed_files(prefix)
    except ValueError:
        return None
    if not files:
        return None
    return files_kind(files)
