"""The two scoring backends and the choice between them.

:class:`MegatronScorer` runs a megarm checkpoint at any TP/PP through the model's
step; rank 0 drives: it sends rows to the other ranks, which follow until it stops
them. :class:`HFScorer` runs an HF export with transformers'
``AutoModelForSequenceClassification``. :func:`open_scorer` picks the backend from
what the directory holds, with its encoder and the reward it records.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import parallel_state as ps

from megarm import distributed, platform
from megarm.checkpoint.load import load_model_weights, saved_model_settings
from megarm.checkpoint.metadata import (
    RewardInfo,
    checkpoint_common,
    is_hf_export,
    reward_info,
    tokenizer_dir,
)
from megarm.config import ConfigError, MegarmConfig, load_config, validate
from megarm.config.checks import label_names
from megarm.errors import ScoringError
from megarm.model.builder import build_model, params_dtype
from megarm.rewards.attributes import Attributes, parse_attribute_weights
from megarm.rewards.batches import make_batches, plan_batches, run_model
from megarm.rewards.encoding import Encoder, build_encoder


class MegatronScorer:
    """A megarm checkpoint loaded at ``tp`` x ``pp`` (x data parallel for the rest of
    the world) in this launch's process group.

    Rank 0 is the driver: :meth:`rewards` sends rows to every rank and returns their
    rewards in order. Every other rank calls :meth:`follow`, which serves the driver
    until :meth:`close` (a context-manager exit) releases it.
    """

    def __init__(
        self,
        load: str,
        tp: int = 1,
        pp: int = 1,
        dtype: str = "auto",
        iteration: int | None = None,
        max_tokens: int = 16384,
        max_rows: int | None = None,
        cp: int = 1,
    ) -> None:
        world = distributed.world_size_from_environ()
        self.load, self.max_tokens, self.max_rows = load, max_tokens, max_rows
        self.path, self.common = checkpoint_common(load, iteration)
        try:
            settings = saved_model_settings(load, iteration)
        except FileNotFoundError as exc:
            raise ScoringError(str(exc)) from exc
        settings["model"]["params_dtype"] = dtype
        if int(settings["model"].get("num_labels") or 1) > 1:  # a regression head
            settings.setdefault("training", {})["objective"] = "regression"
        settings["parallel"] = {
            "tensor_model_parallel_size": tp,
            "pipeline_model_parallel_size": pp,
            "context_parallel_size": cp,
        }
        try:
            self.cfg: MegarmConfig = load_config(None, settings=settings)
        except ConfigError as exc:
            raise ScoringError(f"{self.path}: {exc}") from exc
        # Only the model and its layout matter here (no data, optimizer or run).
        problems = [
            i for i in validate(self.cfg, world) if i.key.split(".")[0] in ("model", "parallel")
        ]
        if problems:
            raise ScoringError(str(ConfigError(problems)))
        self.max_positions = self.cfg.model.max_position_embeddings
        self.vocab_size = self.cfg.model.vocab_size
        self.launch = distributed.init(
            tp, pp, seed=self.cfg.training.seed, context_parallel_size=cp
        )
        self.model = build_model(self.cfg)
        load_model_weights(load, self.model, iteration)
        self.is_driver = self.launch.rank == 0
        self.world = self.launch.world_size
        self.pad_id = 0
        self._open = True
        # A regression head's attributes (one-label reward models: none).
        self.label_names = tuple(label_names(self.cfg)) if self.cfg.model.num_labels > 1 else None
        self.attributes = Attributes(self.label_names)

    def _local(self, rows: list[list[int]]) -> dict[int, float]:
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        batches = make_batches(rows, self.pad_id, self.max_tokens, self.max_rows)[dp_rank::dp]
        found = run_model(self.model, batches)
        merged: dict[int, float] = {}
        for part in distributed.gather_objects(found, dst=0) or []:
            merged.update(part)  # type: ignore[arg-type]
        return merged

    def outputs(self, rows: list[list[int]]) -> list[float | list[float]]:
        """(Driver) the head's outputs for ``rows``, in order: a reward each, or a
        list of attribute values for a regression head."""
        if not rows:
            return []
        distributed.broadcast_object(("score", rows))
        found = self._local(rows)
        if len(found) != len(rows):
            raise RuntimeError(f"got rewards for {len(found)} of {len(rows)} sequences")
        return [found[i] for i in range(len(rows))]

    def rewards(self, rows: list[list[int]]) -> list[float]:
        """(Driver) rewards of ``rows``, in order (a regression head's: the
        ``attributes``-weighted sum)."""
        return [self.attributes.reward(v) for v in self.outputs(rows)]

    def ping(self) -> None:
        """(Driver) keep idle followers' collectives from timing out."""
        distributed.broadcast_object(("ping", None))

    def follow(self) -> None:
        """(Every rank but 0) serve the driver's requests until it closes."""
        while True:
            command, rows = distributed.broadcast_object(None)  # type: ignore[misc]
            if command == "stop":
                return
            if command == "score":
                self._local(rows)

    def close(self) -> None:
        """Release the followers (driver) and tear the process groups down."""
        if not self._open:
            return
        self._open = False
        try:
            if self.is_driver and self.world > 1:
                distributed.broadcast_object(("stop", None))
        finally:
            distributed.teardown()

    def __enter__(self) -> MegatronScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HFScorer:
    """An HF export (``*ForSequenceClassification``: one label, or a regression head
    of several) in transformers, on
    this process's device; right padding with an attention mask."""

    is_driver = True

    def __init__(
        self, load: str, dtype: str = "auto", max_tokens: int = 16384, max_rows: int | None = None
    ) -> None:
        from transformers import AutoConfig, AutoModelForSequenceClassification

        if distributed.world_size_from_environ() > 1:
            raise ScoringError(
                f"{load} is an HF export: score it in one process (python, not torchrun)"
            )
        config = AutoConfig.from_pretrained(load)
        labels = int(getattr(config, "num_labels", 1))
        if labels != 1 and getattr(config, "problem_type", None) != "regression":
            raise ScoringError(
                f"{load} has num_labels={labels} and is not a regression head "
                "(problem_type); a reward model has 1 label"
            )
        self.label_names = (tuple(config.id2label[i] for i in range(labels)) if labels > 1
                            else None)
        self.attributes = Attributes(self.label_names)
        cfg = load_config(None, settings={"model": {"params_dtype": dtype}})
        self.device = platform.device()
        self.model = (
            AutoModelForSequenceClassification.from_pretrained(load, dtype=params_dtype(cfg))
            .to(self.device)
            .eval()
        )
        self.max_positions = int(getattr(config, "max_position_embeddings", 0) or 0) or None
        self.vocab_size = int(config.vocab_size)
        # transformers reads the reward at the last token that is not pad_token_id;
        # without one it can only score one row at a time.
        self.pad_id = config.pad_token_id if config.pad_token_id is not None else 0
        self.max_tokens = max_tokens
        self.max_rows = max_rows if config.pad_token_id is not None else 1
        self.world = 1

    def rewards(self, rows: list[list[int]]) -> list[float]:
        """Rewards of ``rows``, in order (a regression head's: the
        ``attributes``-weighted sum)."""
        return [self.attributes.reward(v) for v in self.outputs(rows)]

    def outputs(self, rows: list[list[int]]) -> list[float | list[float]]:
        """The head's outputs for ``rows``, in order: a reward each, or a list of
        attribute values for a regression head."""
        out: list[float | list[float]] = [0.0] * len(rows)
        for ids in plan_batches([len(r) for r in rows], self.max_tokens, self.max_rows):
            width = len(rows[ids[0]])
            tokens = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(tokens)
            for i, r in enumerate(ids):
                tokens[i, : len(rows[r])] = torch.tensor(rows[r])
                mask[i, : len(rows[r])] = 1
            with torch.no_grad():
                logits = self.model(
                    input_ids=tokens.to(self.device), attention_mask=mask.to(self.device)
                ).logits
            values = logits.float().cpu() if self.label_names else logits[:, 0].float().cpu()
            for r, value in zip(ids, values.tolist(), strict=True):
                out[r] = value
        return out

    def ping(self) -> None:
        """Nothing to keep alive in one process."""

    def follow(self) -> None:
        """One process: there are no followers."""

    def close(self) -> None:
        """Nothing to release."""

    def __enter__(self) -> HFScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


Scorer = MegatronScorer | HFScorer


@dataclass
class ScorerSpec:
    """What to score with, as the scoring commands' shared options give it
    (:func:`megarm.cli.add_model_arguments`)."""

    load: str
    """A megarm checkpoint or an HF export directory."""
    iteration: int | None = None
    """Checkpoint iteration (``None``: the latest)."""
    tokenizer_name_or_path: str | None = None
    """Tokenizer directory (``None``: the one in ``load``, else the run's)."""
    prompt_type: str = "auto"
    """Chat format, as in preprocessing."""
    sequence_end: str | None = None
    """What every response ends with (``None``: the model's recorded convention)."""
    seq_length: int | None = None
    """Max tokens per sequence (``None``: the model's max positions)."""
    truncation: str = "left"
    """Preprocessing's truncation policy for long prompts."""
    tensor_model_parallel_size: int = 1
    """TP of a megarm checkpoint's scoring launch."""
    pipeline_model_parallel_size: int = 1
    """PP of a megarm checkpoint's scoring launch."""
    context_parallel_size: int = 1
    """CP of a megarm checkpoint's scoring launch (long inputs)."""
    max_batch_tokens: int = 16384
    """Padded tokens per micro-batch (rows x longest row)."""
    micro_batch_size: int | None = None
    """Max rows per micro-batch (``None``: no limit)."""
    params_dtype: str = "auto"
    """Compute dtype (``auto``: bf16 on CUDA, fp32 on CPU)."""
    attribute_weights: str | None = None
    """A regression head's scalar reward: ``name=weight,...`` (``None``: every
    attribute weighs 1); :mod:`megarm.rewards.attributes`."""


def is_process_reward_model(load: str, common: dict | None, info: RewardInfo) -> bool:
    """A PRM checkpoint (saved with ``training.objective: prm``) or export (a
    ``*ForTokenClassification``, or a reward convention with a step marker)."""
    if (info.convention or {}).get("step_marker"):
        return True
    if common is not None:
        saved = (common.get("megarm_config") or {}).get("training") or {}
        return saved.get("objective") == "prm"
    import json

    config = json.loads((Path(load) / "config.json").read_text())
    return any(str(a).endswith("ForTokenClassification") for a in config.get("architectures") or [])


def open_scorer(args: ScorerSpec) -> tuple[Scorer, Encoder, RewardInfo]:
    """The model, its encoder and what it records.

    Every rank of a launch calls this (each builds the encoder: followers need its
    pad id)."""
    if args.max_batch_tokens < 1 or (
        args.micro_batch_size is not None and args.micro_batch_size < 1
    ):
        raise ScoringError("--max-batch-tokens and --micro-batch-size must be >= 1")
    if not Path(args.load).exists():
        raise ScoringError(f"--load {args.load} does not exist")
    info = reward_info(args.load, args.iteration)
    common = None if is_hf_export(args.load) else checkpoint_common(args.load, args.iteration)[1]
    if is_process_reward_model(args.load, common, info):
        raise ScoringError(
            f"{args.load} is a process reward model (training.objective=prm): it scores every "
            "step, and per-step scoring in megarm.score / serve / evaluate is not built yet "
            "(issue #29). Read its *ForTokenClassification export's logits at the "
            "step_marker_id tokens of config.json with transformers meanwhile"
        )
    tokenizer = tokenizer_dir(args.load, args.tokenizer_name_or_path, common)
    sequence_end = args.sequence_end or (info.convention or {}).get("sequence_end")
    scorer: Scorer
    if common is None:
        scorer = HFScorer(
            args.load, args.params_dtype, args.max_batch_tokens, args.micro_batch_size
        )
    else:
        scorer = MegatronScorer(
            args.load,
            args.tensor_model_parallel_size,
            args.pipeline_model_parallel_size,
            args.params_dtype,
            args.iteration,
            args.max_batch_tokens,
            args.micro_batch_size,
            args.context_parallel_size,
        )
    try:
        seq_length = args.seq_length or scorer.max_positions
        if scorer.max_positions and seq_length > scorer.max_positions:
            raise ScoringError(
                f"--seq-length {seq_length} exceeds the model's {scorer.max_positions} positions"
            )
        encoder = build_encoder(
            tokenizer, args.prompt_type, sequence_end, seq_length, args.truncation
        )
        if len(encoder.tokenizer) > scorer.vocab_size:
            raise ScoringError(
                f"tokenizer {tokenizer} has {len(encoder.tokenizer)} tokens but the model's "
                f"vocabulary has {scorer.vocab_size}; pass the tokenizer the model was trained with"
            )
        if isinstance(scorer, MegatronScorer):  # an HF model pads with its config's id
            scorer.pad_id = encoder.pad_id
        scorer.attributes = parse_attribute_weights(args.attribute_weights, scorer.label_names)
    except BaseException:
        scorer.close()
        raise
    return scorer, encoder, info
