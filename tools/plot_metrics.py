"""Plot a run's metrics: ``python tools/plot_metrics.py <log_dir> [--out DIR]``.

Writes PNGs next to the metrics (or into ``--out``): training and validation
loss, accuracy and reward gap over iterations (``curves.png``), and a histogram
of chosen and rejected rewards from the last evaluation (``rewards_hist.png``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Accuracy on a fixed [0, 1] axis: auto-scaled, 0.97-1.00 looked like a wild curve.
FIXED_AXES = {"accuracy": (0.0, 1.0)}


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSON-lines file (empty when it does not exist)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot(log_dir: Path, out: Path) -> list[Path]:
    """Write the plots for ``log_dir`` into ``out``; return the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_jsonl(log_dir / "metrics.jsonl")
    if not records:
        raise FileNotFoundError(f"no metrics in {log_dir / 'metrics.jsonl'}; is it a run's log_dir?")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    panels = [("loss", "Bradley-Terry loss"), ("accuracy", "accuracy (r_c > r_r)"),
              ("reward_gap", "reward gap r_c - r_r")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for split, style in (("train", "-"), ("valid", "o-")):
            rows = [r for r in records if r.get("split") == split and key in r]
            if rows:
                ax.plot([r["iteration"] for r in rows], [r[key] for r in rows], style, label=split)
        ax.set_title(title)
        if key in FIXED_AXES:
            ax.set_ylim(*FIXED_AXES[key])
        ax.set_xlabel("iteration")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
    written.append(out / "curves.png")

    evals = read_jsonl(log_dir / "eval_rewards.jsonl")
    if evals:
        last = evals[-1]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.hist(last["chosen"], bins=40, alpha=0.6, label="chosen")
        ax.hist(last["rejected"], bins=40, alpha=0.6, label="rejected")
        ax.set_title(f"validation rewards at iteration {last['iteration']}")
        ax.set_xlabel("reward")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "rewards_hist.png", dpi=110)
        plt.close(fig)
        written.append(out / "rewards_hist.png")
    return written


def main(argv: list[str] | None = None) -> int:
    """Command-line entry."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log_dir", type=Path, help="a run's logging.log_dir")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: log_dir)")
    args = parser.parse_args(argv)
    try:
        for path in plot(args.log_dir, args.out or args.log_dir):
            print(path)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
