"""Per-iteration metrics: a Megatron-style stdout line, metrics.jsonl, TensorBoard,
and Weights & Biases when ``logging.wandb_project`` is set (wandb is optional and
imported only then). Every metric goes to the files; the line shows the loss (the
objective's), the pairwise and LM losses, perplexity, supervised tokens, accuracy
and rewards when the run has them."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from megarm.config import LoggingConfig

_LINE_KEYS = (
    ("loss", "loss", ".4f"),
    ("rm_loss", "rm loss", ".4f"),
    ("lm_loss", "lm loss", ".4f"),
    ("perplexity", "ppl", ".3f"),
    ("lm_tokens", "lm tokens", ".0f"),
    ("moe_aux_loss", "moe aux loss", ".4f"),
    ("moe_load_balance", "expert balance", ".3f"),
    ("moe_z_loss", "moe z loss", ".4f"),
    ("accuracy", "acc", ".3f"),
    ("reward_gap", "gap", ".3f"),
    ("chosen_reward", "r_c", ".3f"),
    ("rejected_reward", "r_r", ".3f"),
    ("grad_norm", "grad norm", ".3f"),
    ("lr", "lr", ".3e"),
    ("tokens_per_s", "tokens/s", ".0f"),
    ("samples_per_s", "pairs/s", ".2f"),
)


class MetricsWriter:
    """Writes metrics on the logging rank only (the last rank: it holds the head).

    Every rank may construct it; ranks with ``enabled=False`` write nothing.
    """

    def __init__(self, log_dir: str | None, enabled: bool, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.log_dir = log_dir
        self.jsonl = None
        self.tb = None
        self.wandb_run: Any = None
        self.start = time.time()
        if not enabled or not log_dir:
            return
        path = Path(log_dir)
        path.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(path / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(path / "tensorboard"))

    def start_wandb(self, logging: LoggingConfig, config: dict[str, Any]) -> None:
        """Also log to W&B (on the logging rank, when ``logging.wandb_project`` is set);
        ``config`` (the resolved megarm config) becomes the run's config."""
        if not self.enabled or not logging.wandb_project:
            return
        try:
            import wandb
        except ImportError as exc:  # validation checks this first; a clear line anyway
            raise RuntimeError(
                "logging.wandb_project is set but wandb is not importable "
                f"({exc}); pip install 'megarm[wandb]' or set logging.wandb_project=null"
            ) from exc
        directory = logging.wandb_dir or self.log_dir
        if directory:
            Path(directory).mkdir(parents=True, exist_ok=True)
        self.wandb_run = wandb.init(
            project=logging.wandb_project,
            entity=logging.wandb_entity,
            name=logging.wandb_name,
            dir=directory,
            mode=logging.wandb_mode,
            config=config,
        )

    def log(self, split: str, iteration: int, metrics: dict[str, Any], total_iters: int) -> None:
        """Record one iteration's (or evaluation's) metrics."""
        if not self.enabled:
            return
        record = {"split": split, "iteration": iteration, "time": round(time.time() - self.start, 3)}
        record.update({k: _clean(v) for k, v in metrics.items()})
        if self.jsonl:
            self.jsonl.write(json.dumps(record) + "\n")
        if self.tb:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(f"{split}/{key}", value, iteration)
        if self.wandb_run is not None:
            scalars = {
                f"{split}/{key}": value
                for key, value in metrics.items()
                if isinstance(value, (int, float)) and math.isfinite(value)
            }
            self.wandb_run.log(scalars, step=iteration)
        print(format_line(split, iteration, total_iters, metrics), flush=True)

    def close(self) -> None:
        """Flush and close the files."""
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def format_line(split: str, iteration: int, total: int, metrics: dict[str, Any]) -> str:
    """`` [train] iteration 3/10 | loss 0.6931 | acc 0.500 | ...`` like Megatron-LM."""
    parts = [f"[{split}] iteration {iteration:>6d}/{total}"]
    if "iteration_time" in metrics:
        parts.append(f"time {metrics['iteration_time'] * 1000:.0f} ms")
    for key, label, fmt in _LINE_KEYS:
        if key in metrics and metrics[key] is not None:
            if key == "samples_per_s" and not metrics.get("pairs"):
                label = "records/s"  # SFT: samples are single records, not pairs
            parts.append(f"{label} {format(metrics[key], fmt)}")
    return " | ".join(parts)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
