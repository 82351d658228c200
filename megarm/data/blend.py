"""Parse ``data_path`` blends and check prefixes, without importing torch.

The config validator calls this before any process starts, so it only looks at
file names: ``<prefix>_packed_<key>_document.{bin,idx}`` (MindSpeed-RL's layout).
"""

from __future__ import annotations

import glob
import re
from pathlib import Path

REQUIRED_KEYS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
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


def packed_files(prefix: str) -> dict[str, str]:
    """Map each packed key (``chosen_input_ids``, ..., ``margin``) to its file path
    without extension, found by glob."""
    found: dict[str, str] = {}
    for path in sorted(glob.glob(glob.escape(prefix) + "_packed_*_document*.idx")):
        stem = path[: -len(".idx")]
        match = PACKED_RE.search(stem[len(prefix):])
        if match:
            found[match.group(1)] = stem
    return found


def prefix_problems(prefix: str) -> list[str]:
    """Messages for a prefix whose packed files are missing or incomplete."""
    files = packed_files(prefix)
    if not files:
        parent = Path(prefix).parent
        hint = "" if parent.is_dir() else f" (directory {parent} does not exist)"
        return [
            f"no files {prefix}_packed_*_document.idx{hint}; "
            "create them with tools/preprocess_data.py --output-prefix"
        ]
    problems = []
    for key in REQUIRED_KEYS:
        if key not in files:
            problems.append(f"{prefix}: missing {prefix}_packed_{key}_document.idx")
        elif not Path(files[key] + ".bin").is_file():
            problems.append(f"{prefix}: missing {files[key]}.bin")
    return problems
