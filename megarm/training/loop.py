"""The training loop: megatron-core DDP, optimizer, scheduler and pipeline schedule.

``Trainer.train()`` reads top to bottom: fetch a global batch (and, with an LM
loss, count its supervised tokens), run the pipeline schedule, reduce metrics over
data-parallel ranks, stop on a non-finite loss, step the optimizer (stopping on a
non-finite grad norm), log, evaluate.
"""

from __future__ import annotations

import json
import math
import signal
import time
from functools import partial
from itertools import islice
from pathlib import Path

# Before megatron-core is first imported: it warns at import about absent optional kernels.
from megarm import platform

# isort: split
import torch
from megatron.core import parallel_state as ps
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)

from megarm.checkpoint import Resumed, RunLock, load_checkpoint, save_checkpoint
from megarm.checkpoint.load import CheckpointMismatchError
from megarm.checkpoint.lock import CheckpointLockedError
from megarm.checkpoint.metadata import CONVENTION_KEY
from megarm.config import MegarmConfig, to_dict, to_yaml
from megarm.config.checks import label_names, label_weights
from megarm.data.blend import parse_data_path
from megarm.data.stats_file import reward_convention
from megarm.distributed import all_gather_objects, all_reduce_host, any_rank, broadcast_object
from megarm.model.builder import build_model, count_parameters, heads
from megarm.model.moe import aux_loss_metrics
from megarm.model.step import PairBatch, holds_rewards, run_schedule
from megarm.rewards.benchmarks import BenchmarkEvaluator
from megarm.rewards.stats import after_training
from megarm.training.data import build_datasets, micro_batches
from megarm.training.loss import loss_func, loss_weights, reduce_stats
from megarm.training.memory import rows_per_record
from megarm.training.metrics import MetricsWriter
from megarm.training.optimizer import NonFiniteGradError, build_optimizer, step_optimizer


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; training stopped before the optimizer step."""


__all__ = ["NonFiniteGradError", "NonFiniteLossError", "Trainer"]


class Trainer:
    """Owns the model chunks, optimizer, scheduler and data streams of one rank."""

    def __init__(self, cfg: MegarmConfig) -> None:
        self.cfg = cfg
        t, p = cfg.training, cfg.parallel
        self.dp_size = ps.get_data_parallel_world_size()
        self.dp_rank = ps.get_data_parallel_rank()
        self.num_microbatches = t.global_batch_size // (t.micro_batch_size * self.dp_size)
        self.is_logging_rank = holds_rewards() and self.dp_rank == 0
        self.contributes = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
        self.lock = self._lock_save_dir()

        # (rm_weight, lm_weight) of training.objective; what loss_func and metrics use.
        self.loss_weights = loss_weights(cfg)
        self.has_value_head, self.has_lm_head = heads(cfg)
        chunks = build_model(cfg)
        config = chunks[0].config
        self.num_parameters = count_parameters(chunks)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            use_distributed_optimizer=p.use_distributed_optimizer,
            # A NaN/inf gradient is refused by step_optimizer's grad-norm check (the
            # norm clipping computes anyway) instead of a norm over every buffer.
            check_for_nan_in_grad=False,
        )
        self.model = [
            DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=i > 0)
            for i, chunk in enumerate(chunks)
        ]
        self.optimizer, self.scheduler = build_optimizer(cfg, self.model)
        # The schedule calls these to all-reduce gradients (DP, and TP for
        # sequence-parallel norms) after the last micro-batch.
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = [m.no_sync for m in self.model]
        if len(self.model) == 1:
            config.no_sync_func = config.no_sync_func[0]

        self.data = build_datasets(cfg)
        self.rows_per_record = rows_per_record(cfg)
        self.label_names, self.label_weights = label_names(cfg), label_weights(cfg)
        self.iteration = 0
        self.consumed_samples = 0
        self.resumed: Resumed | None = None
        if cfg.checkpoint.load:
            self._check_heads_in_checkpoint(chunks)
            # A previous run (exact resume) or converted weights (weights only), at any
            # TP/PP/DP; files verified and shapes checked before any shard is read.
            self.resumed = load_checkpoint(cfg, self.model, self.optimizer, self.scheduler)
            # The loaded param groups carry the saving run's Adam kernel choice.
            platform.apply_adam_kernel(self.optimizer)
            for chunk in chunks:  # saved checkpoints hold the value head again
                chunk.value_head_in_checkpoint = True
            self.iteration = self.resumed.iteration
            self.consumed_samples = self.resumed.consumed_samples
        self.history: list[dict[str, float]] = []
        self.train_stream = micro_batches(
            self.data.train, cfg, self.data.pad_token_id, self.dp_rank, self.dp_size,
            consumed_samples=self.consumed_samples, reward_offsets=cfg.training.reward_offsets,
        )
        self.start_time = time.time()
        self.sigterm = False
        signal.signal(signal.SIGTERM, self._on_sigterm)
        self.writer = MetricsWriter(
            cfg.logging.log_dir, self.is_logging_rank, cfg.logging.tensorboard
        )
        self.writer.start_wandb(cfg.logging, to_dict(cfg))
        self.benchmark = (
            BenchmarkEvaluator(
                t.eval_benchmark, cfg.data.tokenizer_name_or_path, t.eval_benchmark_format,
                cfg.data.seq_length,
            )
            if t.eval_benchmark
            else None
        )
        if self.is_logging_rank and cfg.logging.log_dir:
            (Path(cfg.logging.log_dir) / "config.yaml").write_text(to_yaml(cfg))

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict[str, float]:
        """Run ``training.train_iters`` optimizer steps; return the last metrics."""
        t = self.cfg.training
        metrics: dict[str, float] = {}
        while self.iteration < t.train_iters:
            start = time.perf_counter()
            batches = list(islice(self.train_stream, self.num_microbatches))
            self.scale_lm_loss(batches)
            self.scale_regression_loss(batches)
            self.scale_step_loss(batches)
            for chunk in self.model:
                chunk.zero_grad_buffer()
            self.optimizer.zero_grad()
            outputs = self.run_schedule(batches, forward_only=False)
            metrics = reduce_stats(
                outputs, self.contributes, self.loss_weights,
                self.cfg.training.center_rewards_coefficient, self.cfg.training.objective,
                self.label_names, self.label_weights,
            )
            if self.cfg.model.num_moe_experts:  # every rank: the tracker's reduction
                metrics.update(aux_loss_metrics(self.num_microbatches, self.cfg.model))
            if not math.isfinite(metrics["loss"]):
                raise NonFiniteLossError(
                    f"loss is {metrics['loss']} at iteration {self.iteration + 1}; stopped "
                    "before the optimizer step (the last saved checkpoint is kept)"
                )
            lr = self.optimizer.param_groups[0]["lr"]
            grad_norm = step_optimizer(self.optimizer, self.iteration + 1)
            self.scheduler.step(increment=1)
            self.iteration += 1
            self.consumed_samples += t.global_batch_size
            platform.synchronize()
            elapsed = time.perf_counter() - start
            metrics.update(
                grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                lr=lr,
                iteration_time=elapsed,
                tokens_per_s=metrics["tokens"] / elapsed,
                samples_per_s=(metrics["pairs"] or metrics["sequences"]) / elapsed,
            )
            self.history.append(dict(metrics, iteration=self.iteration))
            if self.iteration % t.log_interval == 0 or self.iteration == t.train_iters:
                self.writer.log("train", self.iteration, metrics, t.train_iters)
            if t.eval_interval and self.iteration % t.eval_interval == 0:
                self.evaluate()
            if self.should_save():
                self.save()
            if self.should_exit():
                if self.cfg.checkpoint.save and not self.should_save():
                    self.save()
                return metrics
        if not t.eval_interval or self.iteration % t.eval_interval:
            self.evaluate()
        if self.cfg.checkpoint.save and not self.should_save():
            self.save()
        # Reward mean/std over the validation split, beside the last checkpoint's weights.
        if self.has_value_head and t.objective not in ("regression", "prm"):  # one per sequence
            after_training(self.model, self.data.valid, self.data.pad_token_id, self.cfg)
        return metrics

    # ------------------------------------------------------------------ pieces

    def scale_lm_loss(self, batches: list[PairBatch]) -> None:
        """Give every micro-batch its ``lm_scale`` (see :mod:`megarm.training.loss`):
        the global batch's supervised tokens are the micro-batches' host counts,
        summed over data-parallel ranks in one host all-reduce (one rank per replica
        contributes), before the schedule runs."""
        if not self.has_lm_head:
            return
        # Counted before the batches are cut for CP: one CP rank per replica adds them.
        counts = self.contributes and ps.get_context_parallel_rank() == 0
        local = sum(b.lm_tokens for b in batches) if counts else 0
        total = float(all_reduce_host(torch.tensor([float(local)], dtype=torch.float64))[0])
        scale = len(batches) * self.dp_size / total if total else 0.0
        for batch in batches:
            batch.lm_scale = scale

    def scale_regression_loss(self, batches: list[PairBatch]) -> None:
        """``objective: regression``: every micro-batch's ``target_scale``, so the
        step's loss is the global batch's weighted mean squared error whatever the
        micro-batches' label counts (known on the host, summed over data-parallel
        ranks in one host all-reduce, as :meth:`scale_lm_loss`)."""
        if self.cfg.training.objective != "regression":
            return
        weights = torch.tensor(self.label_weights, dtype=torch.float64)
        local = sum(float((weights * b.target_mask.sum(0)).sum()) for b in batches) \
            if self.contributes else 0.0
        total = float(all_reduce_host(torch.tensor([local], dtype=torch.float64))[0])
        scale = len(batches) * self.dp_size / total if total else 0.0
        for batch in batches:
            batch.target_scale = scale

    def scale_step_loss(self, batches: list[PairBatch]) -> None:
        """``objective: prm``: every micro-batch's ``step_scale``, so the step's loss is
        the mean over the global batch's steps whatever each micro-batch holds (the
        counts are on the host, summed over data-parallel ranks in one host
        all-reduce, as :meth:`scale_lm_loss`)."""
        if self.cfg.training.objective != "prm":
            return
        local = float(sum(b.num_steps for b in batches)) if self.contributes else 0.0
        total = float(all_reduce_host(torch.tensor([local], dtype=torch.float64))[0])
        scale = len(batches) * self.dp_size / total if total else 0.0
        for batch in batches:
            batch.step_scale = scale

    def run_schedule(self, batches: list[PairBatch], forward_only: bool) -> list[dict]:
        """One pass of megatron-core's pipeline schedule over ``batches``."""
        rm_weight, lm_weight = self.loss_weights
        rows = self.cfg.training.micro_batch_size * self.rows_per_record
        return run_schedule(
            self.model,
            batches,
            partial(
                loss_func,
                rm_weight=rm_weight,
                lm_weight=lm_weight,
                center_coef=self.cfg.training.center_rewards_coefficient,
                label_weights=torch.tensor(self.label_weights, dtype=torch.float32),
                listwise_loss=self.cfg.training.listwise_loss,
                consistency_coef=self.cfg.training.reward_consistency_coefficient,
                prm_loss=self.cfg.training.prm_loss,
            ),
            forward_only=forward_only,
            seq_length=self.cfg.data.seq_length,
            micro_batch_size=rows,
        )

    def recorded_convention(self) -> dict | None:
        """Where the reward is read (the data's stats.json), and, with
        ``training.reward_offsets``, the other positions it was trained at
        (``also_trained_at``: tokens before the reward token)."""
        if not self.cfg.data.data_path:
            return None
        convention = reward_convention(parse_data_path(self.cfg.data.data_path)[0][1])
        if convention is not None and self.cfg.training.reward_offsets:
            convention = {**convention, "also_trained_at": [
                f"{k} token{'s' if k > 1 else ''} before" for k in self.cfg.training.reward_offsets]}
        return convention

    def evaluate(self) -> dict[str, float] | None:
        """Validation metrics (and ``training.eval_benchmark``'s scores, every rank
        scoring in step); returns the validation metrics."""
        metrics = self.validate()
        if self.benchmark is not None:
            scores = self.benchmark(self.model, self.data.pad_token_id)
            self.writer.log("benchmark", self.iteration, scores, self.cfg.training.train_iters)
        return metrics

    def validate(self) -> dict[str, float] | None:
        """Metrics over up to ``eval_iters`` global batches of the validation split."""
        valid = self.data.valid
        if valid is None:
            return None
        t = self.cfg.training
        per_step = t.micro_batch_size * self.dp_size
        steps = min(t.eval_iters * self.num_microbatches, len(valid) // per_step)
        if steps == 0:
            return None
        stream = micro_batches(
            valid, self.cfg, self.data.pad_token_id, self.dp_rank, self.dp_size, shuffle=False
        )
        for chunk in self.model:
            chunk.eval()
        with torch.no_grad():
            outputs = self.run_schedule(list(islice(stream, steps)), forward_only=True)
        for chunk in self.model:
            chunk.train()
        metrics = reduce_stats(
            outputs, self.contributes, self.loss_weights,
            self.cfg.training.center_rewards_coefficient, self.cfg.training.objective,
                self.label_names, self.label_weights,
        )
        self.writer.log("valid", self.iteration, metrics, t.train_iters)
        if self.has_value_head and t.objective in ("rm", "joint"):  # pairs: chosen, rejected
            self.write_eval_rewards(outputs)
        return metrics

    def write_eval_rewards(self, outputs: list[dict]) -> None:
        """Every validation pair's chosen and rejected reward, for the histogram plot."""
        if not self.cfg.logging.log_dir:
            return
        mine: list[list[float]] = [[], []]
        if holds_rewards():
            for out in outputs:
                chosen, rejected = out["rewards"].float().cpu().chunk(2)
                mine[0] += chosen.tolist()
                mine[1] += rejected.tolist()
        gathered = all_gather_objects(mine)
        if self.is_logging_rank:
            record = {
                "iteration": self.iteration,
                "chosen": [r for g in gathered for r in g[0]],
                "rejected": [r for g in gathered for r in g[1]],
            }
            path = Path(self.cfg.logging.log_dir) / "eval_rewards.jsonl"
            with open(path, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def _check_heads_in_checkpoint(self, chunks: list[torch.nn.Module]) -> None:
        """Before loading: an LM objective needs the checkpoint's output layer (the
        tied embedding needs none); a value head the checkpoint lacks (an SFT model
        for the joint stage) keeps its seeded init, said once. A checkpoint saved
        for another objective is read as weights only (``checkpoint.finetune``)."""
        from megatron.core import dist_checkpointing

        from megarm.checkpoint import read_common, resolve_checkpoint
        from megarm.families import head_weight

        c = self.cfg.checkpoint
        path = resolve_checkpoint(c.load, c.ckpt_step)
        stored = dist_checkpointing.load_tensors_metadata(str(path))
        common = read_common(path)
        saved = ((common.get("megarm_config") or {}).get("training") or {}).get("objective", "rm")
        objective = self.cfg.training.objective
        if saved != objective and common.get("has_optimizer") and not c.finetune:
            raise CheckpointMismatchError(
                f"{path} was trained with training.objective={saved}, this run has "
                f"{objective}: its optimizer state belongs to other heads. Pass "
                "checkpoint.finetune=true to start from its weights"
            )
        if self.has_lm_head and not self.cfg.model.tie_word_embeddings:
            if head_weight("lm") not in stored:
                raise CheckpointMismatchError(
                    f"{path} has no LM output layer ({head_weight('lm')}), which "
                    f"training.objective={objective} trains: convert the HF model with "
                    "ckpt_convert/hf2mcore.py --keep-lm-head (or start from an SFT run)"
                )
        value = head_weight("value")
        # A reward model's 1-output head does not fit a regression head of
        # model.num_labels outputs: that head starts fresh too (weights-only start).
        other_head = value in stored and tuple(stored[value].global_shape)[0] != self.cfg.model.num_labels
        if self.has_value_head and (value not in stored or other_head):
            if other_head and not c.finetune:
                raise CheckpointMismatchError(
                    f"{path} has a value head of {tuple(stored[value].global_shape)[0]} "
                    f"output(s), this run's has model.num_labels={self.cfg.model.num_labels}: "
                    "pass checkpoint.finetune=true to start from its trunk with a fresh head"
                )
            for chunk in chunks:
                chunk.value_head_in_checkpoint = False
            if self.is_logging_rank:
                what = "a value head of another size" if other_head else "no value head (an SFT model)"
                print(
                    f"megarm: {path} has {what}: the value head starts "
                    f"from its init (training.seed={self.cfg.training.seed})",
                    flush=True,
                )

    def should_save(self) -> bool:
        """A save is due at this iteration (``save_interval``, or the last one)."""
        c = self.cfg.checkpoint
        if not c.save:
            return False
        every = c.save_interval and self.iteration % c.save_interval == 0
        return bool(every) or self.iteration == self.cfg.training.train_iters

    def _lock_save_dir(self) -> RunLock | None:
        """Hold ``checkpoint.save`` for this run (rank 0 takes it; all ranks agree)."""
        if not self.cfg.checkpoint.save:
            return None
        lock, outcome = RunLock(self.cfg.checkpoint.save), None
        if torch.distributed.get_rank() == 0:
            try:
                outcome = ("note", lock.acquire())
            except CheckpointLockedError as exc:
                outcome = ("error", str(exc))
        kind, text = broadcast_object(outcome)
        if kind == "error":
            raise CheckpointLockedError(text)
        if text and torch.distributed.get_rank() == 0:
            print(f"megarm: {text}", flush=True)
        return lock

    def save(self) -> None:
        """Save model, optimizer, scheduler, RNG and data position (torch_dist)."""
        if self.lock is not None:
            self.lock.refresh()
        path = save_checkpoint(
            self.cfg.checkpoint.save,
            self.iteration,
            self.model,
            {
                "iteration": self.iteration,
                "consumed_samples": self.consumed_samples,
                "megarm_config": to_dict(self.cfg),
                # Where the reward is read (from the data's stats.json), for scoring/export.
                CONVENTION_KEY: self.recorded_convention(),
                "has_optimizer": True,
            },
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            keep_last=self.cfg.checkpoint.keep_last,
        )
        if self.is_logging_rank:
            print(f"saved checkpoint {path}", flush=True)

    def _on_sigterm(self, signum, frame) -> None:  # noqa: ANN001
        # SLURM sends SIGTERM before preemption: finish the step, save, exit.
        self.sigterm = True

    def should_exit(self) -> bool:
        """SIGTERM, ``exit_interval`` or ``exit_duration_in_mins``, agreed by all ranks."""
        t = self.cfg.training
        minutes = (time.time() - self.start_time) / 60
        local = (
            self.sigterm
            or bool(t.exit_interval and self.iteration % t.exit_interval == 0)
            or bool(t.exit_duration_in_mins and minutes >= t.exit_duration_in_mins)
        )
        stop = any_rank(local)
        if stop and self.is_logging_rank:
            print(f"exiting at iteration {self.iteration} (signal or exit condition)", flush=True)
        return stop

    def close(self) -> None:
        """Flush metrics files; let another run write the checkpoint directory."""
        self.writer.close()
        if self.lock is not None:
            self.lock.release()
