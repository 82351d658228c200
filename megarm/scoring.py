"""The scoring core shared by ``megarm.score``, ``megarm.serve``, ``megarm.evaluate`` and
``megarm.reward_stats``: text in, rewards out, from a megarm checkpoint or an HF export.

- :class:`Encoder` turns records, chat messages or chat-formatted text into token rows
  exactly as training saw them: preference records go through preprocessing's own
  record encoder (:func:`megarm.data.preprocess.encode_records`), everything else
  through the same template, tokenizer calls and truncation rule (``fit_prompt``).
  Every row ends with the template's response end (``<|im_end|>\\n`` for ChatML), the
  reward convention recorded with the model, whatever form the client sent.
- :func:`plan_batches` groups rows into micro-batches by padded tokens, longest first.
- :class:`MegatronScorer` runs a megarm checkpoint at any TP/PP through training's
  batch code (``collate_pairs``) and step (``forward_step`` under megatron-core's
  pipeline schedule, forward only). Rank 0 drives: it sends rows to the other ranks,
  which follow until it stops them. :class:`HFScorer` runs an HF export with
  transformers' ``AutoModelForSequenceClassification``.

:func:`open_scorer` picks the backend from what ``--load`` holds.

Critique models (``--critique-model``, the HF ``*ForCausalLM`` export) first write a
critique of each response (:class:`megarm.generate.CritiqueWriter`); the reward is
then read at the end of prompt + response + critique turn + critique
(:meth:`Encoder.critique_rows`, the rows preprocessing's ``critique_pairs`` writes).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_model_config
from torch import Tensor

from megarm import distributed, platform
from megarm.checkpoint import (
    checkpoint_model_overrides,
    load_model_weights,
    read_common,
    resolve_checkpoint,
)
from megarm.config import ConfigError, MegarmConfig, load_config, validate
from megarm.data.dataset import collate_pairs
from megarm.data.handlers import Handler, RecordError
from megarm.data.preprocess import TRUNCATION_POLICIES, encode_records, fit_prompt
from megarm.data.readers import RawRecord
from megarm.data.templates import (
    DEFAULT_CRITIQUE_PROMPT,
    Template,
    TemplateError,
    critique_turn,
    get_template,
    reward_convention,
)
from megarm.data.tokenizer import TokenizerError, load_tokenizer
from megarm.model.builder import build_model, params_dtype
from megarm.training.step import PairBatch, forward_step

TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
# Written next to a checkpoint's weights by megarm.reward_stats (and after training).
REWARD_STATS_FILE = "reward_stats.json"
# Common-state key of a megarm checkpoint that records where the reward is read.
CONVENTION_KEY = "reward_convention"


class ScoringError(RuntimeError):
    """Scoring cannot start or go on; the message names the input and the fix."""


# --------------------------------------------------------------------------- encoding


def chat_messages(value: Any, what: str = "messages") -> list[dict[str, str]]:
    """A list of ``{"role", "content"}`` messages (text content), or ``RecordError``."""
    if not isinstance(value, list) or not value:
        raise RecordError("malformed_record", f"{what} must be a non-empty list of messages")
    out = []
    for message in value:
        if not (
            isinstance(message, dict)
            and message.get("role") in ("system", "user", "assistant")
            and isinstance(message.get("content"), str)
        ):
            raise RecordError(
                "malformed_record",
                f"{what} holds a message without a system/user/assistant role and text content",
            )
        out.append({"role": message["role"], "content": message["content"]})
    return out


def prompt_messages(value: Any, what: str = "prompt") -> list[dict[str, str]]:
    """A prompt given as text (one user turn) or as messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return chat_messages(value, what)


class Encoder:
    """Text -> token rows in the form the model was trained on.

    ``seq_length`` caps a row (``None``: no cap); a longer prompt is cut by
    ``truncation`` (preprocessing's policies: ``left``, ``right``, ``drop``), the
    responses never are. Methods raise :class:`RecordError` for input they cannot use.
    """

    def __init__(
        self,
        tokenizer: Any,
        template: Template,
        seq_length: int | None = None,
        truncation: str = "left",
    ) -> None:
        if truncation not in TRUNCATION_POLICIES:
            raise ScoringError(f"--truncation {truncation!r}: choose from {TRUNCATION_POLICIES}")
        self.tokenizer = tokenizer
        self.template = template
        self.seq_length = seq_length
        self.truncation = truncation
        self.header_len = len(self._encode([template.header])[0])
        # Padding a client may leave after the response (never the end-of-turn marker).
        self.trailing = tuple(
            t for t in {tokenizer.pad_token, tokenizer.eos_token} if t and t != template.end_of_turn
        )
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.pad_id = int(pad)

    @property
    def convention(self) -> dict[str, Any]:
        """Where the reward is read (:func:`megarm.data.templates.reward_convention`)."""
        return reward_convention(self.template, self.tokenizer)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        # As preprocessing: no BOS/EOS added, the template carries the specials.
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def _join(self, prompt: str, responses: list[str]) -> tuple[list[list[int]], bool]:
        ids = self._encode([prompt, *responses])
        cut, truncated = fit_prompt(
            ids[0], max(len(r) for r in ids[1:]), self.seq_length, self.header_len, self.truncation
        )
        return [cut + response for response in ids[1:]], truncated

    def pairs(
        self, records: Iterable[RawRecord], handler: Handler
    ) -> Iterator[tuple[RawRecord, tuple]]:
        """Preference records through preprocessing's record encoder: ``(raw, result)``
        with result ``("ok", prompt, chosen, rejected, margin, truncated)`` or
        ``("reject", reason, detail)``."""
        return encode_records(
            records, handler, self.template, self.tokenizer, self.seq_length, self.truncation
        )

    def group(
        self, prompt: Any, responses: Sequence[Any], allow_empty: bool = False
    ) -> tuple[list[list[int]], bool]:
        """Rows for several responses to one prompt (text or messages), sharing one
        cut prompt as preprocessing's chosen and rejected do; and whether it was cut.
        An empty response is refused unless ``allow_empty`` (benchmarks score them)."""
        messages = prompt_messages(prompt)
        for response in responses:
            if not isinstance(response, str):
                raise RecordError("malformed_record", "a response is not text")
            if not response.strip() and not allow_empty:
                raise RecordError("empty_response", "a response is empty")
        if not responses:
            raise RecordError("missing_key", "no responses to score")
        prompt_text = self.template.prompt(messages)
        return self._join(prompt_text, [self.template.response(r) for r in responses])

    def critique_rows(
        self,
        prompt: Any,
        responses: Sequence[str],
        critiques: Sequence[str],
        critique_prompt: str = DEFAULT_CRITIQUE_PROMPT,
    ) -> tuple[list[list[int]], bool]:
        """Rows of a critique model: prompt + response + critique turn + critique per
        response, tokenized in the same parts as preprocessing's ``critique_pairs``
        (one shared prompt, cut as there); and whether the prompt was cut."""
        messages = prompt_messages(prompt)
        head: list[int] = []
        tails = []
        for response, critique in zip(responses, critiques, strict=True):
            text, rest = critique_turn(self.template, messages, response, critique_prompt)
            head, rest_ids, critique_ids = self._encode(
                [text, rest, self.template.response(critique)]
            )
            tails.append(rest_ids + critique_ids)
        cut, truncated = fit_prompt(
            head, max(map(len, tails)), self.seq_length, self.header_len, self.truncation
        )
        return [cut + tail for tail in tails], truncated

    def conversation(self, messages: Any) -> list[int]:
        """The row for a conversation whose last message is the scored assistant turn."""
        checked = chat_messages(messages)
        if checked[-1]["role"] != "assistant":
            raise RecordError(
                "malformed_record", "the last message must be the assistant response to score"
            )
        return self.group(checked[:-1], [checked[-1]["content"]])[0][0]

    def text(self, text: Any, prompt: Any = None) -> list[int]:
        """The row for a chat-formatted conversation as text (OpenRLHF's ``query``):
        padding dropped, the response end put into the model's form, the prompt split
        off at ``prompt`` (when ``text`` starts with it) or at the last assistant header."""
        if not isinstance(text, str):
            raise RecordError("malformed_record", "a query is not text")
        head, response = self.template.split_text(
            text, prompt if isinstance(prompt, str) else None, self.trailing
        )
        return self._join(head, [response])[0][0]


def build_encoder(
    tokenizer_dir: str,
    prompt_type: str = "auto",
    sequence_end: str | None = None,
    seq_length: int | None = None,
    truncation: str = "left",
) -> Encoder:
    """Load the tokenizer and template; ``ScoringError`` with the fix when unusable."""
    try:
        tokenizer = load_tokenizer(tokenizer_dir)
        template = get_template(prompt_type, tokenizer, sequence_end)
    except (TokenizerError, TemplateError) as exc:
        raise ScoringError(str(exc)) from exc
    return Encoder(tokenizer, template, seq_length, truncation)


# --------------------------------------------------------------------------- batches


def plan_batches(
    lengths: Sequence[int], max_tokens: int, max_rows: int | None = None
) -> list[list[int]]:
    """Row indices grouped into micro-batches, longest rows first, each holding at most
    ``max_tokens`` padded tokens (rows x longest row) and ``max_rows`` rows; a row
    longer than ``max_tokens`` goes alone."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for index in order:
        current = batches[-1] if batches else None
        if (
            current is not None
            and (len(current) + 1) * lengths[current[0]] <= max_tokens
            and (max_rows is None or len(current) < max_rows)
        ):
            current.append(index)
        else:
            batches.append([index])
    return batches


@dataclass
class ScoreBatch:
    """One scoring micro-batch: right-padded rows and the global number of each row."""

    tokens: Tensor
    position_ids: Tensor
    reward_index: Tensor
    rows: Tensor
    """``[n]`` global row number of each row (``-1``: a filler row, reward dropped)."""
    attention_mask: Tensor | None = None

    def pair_batch(self) -> PairBatch:
        """Training's micro-batch for these rows. Training pairs row ``i`` with row
        ``i + n/2``; here that is only a layout (the pair loss is computed and
        ignored), so an odd batch gets one filler copy of its last row."""
        tokens, positions, index = self.tokens, self.position_ids, self.reward_index
        mask = self.attention_mask
        if tokens.shape[0] % 2:
            tokens, positions, index = (torch.cat([t, t[-1:]]) for t in (tokens, positions, index))
            mask = None if mask is None else torch.cat([mask, mask[-1:]])
        batch = PairBatch(
            tokens=tokens,
            position_ids=positions,
            reward_index=index,
            margin=torch.zeros(tokens.shape[0] // 2),
            attention_mask=mask,
        )
        return batch.to(platform.device())


def make_batches(
    rows: Sequence[Sequence[int]],
    pad_id: int,
    max_tokens: int,
    max_rows: int | None = None,
    pad_to_multiple_of: int = 1,
) -> list[ScoreBatch]:
    """Micro-batches of ``rows`` (see :func:`plan_batches`), padded by training's
    ``collate_pairs`` (the first half of a batch as "chosen", the rest as "rejected";
    the width a multiple of ``pad_to_multiple_of``, as sequence parallelism needs)."""
    batches = []
    for ids in plan_batches([len(r) for r in rows], max_tokens, max_rows):
        half = (len(ids) + 1) // 2
        first, second = ids[:half], ids[half:] + ids[len(ids) - 1 :] * (len(ids) % 2)
        samples = []
        for a, b in zip(first, second, strict=True):
            chosen, rejected = np.asarray(rows[a]), np.asarray(rows[b])
            samples.append(
                {
                    "chosen_input_ids": chosen,
                    "chosen_labels": chosen,
                    "rejected_input_ids": rejected,
                    "rejected_labels": rejected,
                }
            )
        collated = collate_pairs(samples, pad_id, pad_to_multiple_of=pad_to_multiple_of)
        order = first + second
        filler = [-1] if len(ids) % 2 else []
        keep = len(order) - len(filler)
        seq = collated["tokens"].shape[1]
        batches.append(
            ScoreBatch(
                tokens=collated["tokens"][:keep],
                position_ids=torch.arange(seq).expand(keep, seq).contiguous(),
                reward_index=collated["lengths"][:keep] - 1,
                rows=torch.tensor(order[:keep]),
            )
        )
    return batches


def run_model(model: list[torch.nn.Module], batches: list[ScoreBatch]) -> dict[int, float]:
    """Rewards by row number for ``batches`` through training's ``forward_step`` under
    megatron-core's pipeline schedule (forward only), on the ranks that hold the value
    head (TP rank 0 of the last stage); an empty dict elsewhere."""
    if not batches:
        return {}
    for chunk in model:
        chunk.eval()
    pair_batches = [b.pair_batch() for b in batches]
    with torch.no_grad():
        iterators = [iter(pair_batches) for _ in model]
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if len(model) > 1 else iterators[0],
            model=model if len(model) > 1 else model[0],
            num_microbatches=len(pair_batches),
            seq_length=max(b.tokens.shape[1] for b in pair_batches),
            micro_batch_size=max(b.tokens.shape[0] for b in pair_batches),
            forward_only=True,
        )
    if not (ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0):
        return {}
    found: dict[int, float] = {}
    for batch, out in zip(batches, outputs, strict=True):
        rewards = out["rewards"].float().cpu().tolist()
        found.update(zip(batch.rows.tolist(), rewards[: batch.rows.shape[0]], strict=True))
    return found


def model_rewards(
    model: list[torch.nn.Module], rows: list[list[int]], pad_id: int, max_tokens: int = 16384
) -> list[float]:
    """Rewards of ``rows`` from a model built in this process group, e.g. training's
    (every rank calls it with the same rows and gets every reward, in order)."""
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    # Sequence parallelism scatters the sequence over the TP ranks.
    sp = get_model_config(model[0]).sequence_parallel
    multiple = ps.get_tensor_model_parallel_world_size() if sp else 1
    batches = make_batches(rows, pad_id, max_tokens, pad_to_multiple_of=multiple)
    found = run_model(model, batches[dp_rank::dp])
    merged: dict[int, float] = {}
    for part in distributed.all_gather_objects(found):
        merged.update(part)  # type: ignore[arg-type]
    return [merged[i] for i in range(len(rows))]


# --------------------------------------------------------------------------- what a model says


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


def read_stats_file(directory: Path) -> dict[str, Any] | None:
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
    stats = read_stats_file(path) or {}
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


# --------------------------------------------------------------------------- backends


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
    ) -> None:
        world = distributed.world_size_from_environ()
        self.load, self.max_tokens, self.max_rows = load, max_tokens, max_rows
        self.path, self.common = checkpoint_common(load, iteration)
        try:
            overrides = checkpoint_model_overrides(load, iteration)
        except FileNotFoundError as exc:
            raise ScoringError(str(exc)) from exc
        overrides += [
            f"model.params_dtype={dtype}",
            f"parallel.tensor_model_parallel_size={tp}",
            f"parallel.pipeline_model_parallel_size={pp}",
        ]
        try:
            self.cfg: MegarmConfig = load_config(None, overrides)
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
        self.launch = distributed.init(tp, pp, seed=self.cfg.training.seed)
        self.model = build_model(self.cfg)
        load_model_weights(load, self.model, iteration)
        self.is_driver = self.launch.rank == 0
        self.world = self.launch.world_size
        self.pad_id = 0
        self._open = True

    def _local(self, rows: list[list[int]]) -> dict[int, float]:
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        batches = make_batches(rows, self.pad_id, self.max_tokens, self.max_rows)[dp_rank::dp]
        found = run_model(self.model, batches)
        merged: dict[int, float] = {}
        for part in distributed.gather_objects(found, dst=0) or []:
            merged.update(part)  # type: ignore[arg-type]
        return merged

    def rewards(self, rows: list[list[int]]) -> list[float]:
        """(Driver) rewards of ``rows``, in order."""
        if not rows:
            return []
        distributed.broadcast_object(("score", rows))
        found = self._local(rows)
        if len(found) != len(rows):
            raise RuntimeError(f"got rewards for {len(found)} of {len(rows)} sequences")
        return [found[i] for i in range(len(rows))]

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
    """An HF export (``*ForSequenceClassification``, one label) in transformers, on
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
        if getattr(config, "num_labels", 1) != 1:
            raise ScoringError(f"{load} has num_labels={config.num_labels}; a reward model has 1")
        cfg = load_config(None, [f"model.params_dtype={dtype}"])
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
        """Rewards of ``rows``, in order."""
        out = [0.0] * len(rows)
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
            for r, value in zip(ids, logits[:, 0].float().cpu().tolist(), strict=True):
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


# --------------------------------------------------------------------------- command lines


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The options every scoring entry point shares (model, text form, layout)."""
    p.add_argument("--load", required=True, help="megarm checkpoint or HF export directory")
    p.add_argument("--iteration", type=int, default=None, help="checkpoint iteration to load")
    p.add_argument(
        "--tokenizer-name-or-path",
        help="tokenizer directory (default: the --load directory, else the one the run used)",
    )
    p.add_argument("--prompt-type", default="auto", help="chat format, as in preprocessing")
    p.add_argument(
        "--sequence-end",
        help="what every response ends with (default: the model's recorded convention, else "
        "what the chat template writes after an assistant turn, e.g. '<|im_end|>\\n')",
    )
    p.add_argument(
        "--seq-length",
        type=int,
        default=None,
        help="max tokens per sequence (default: the model's max positions); longer prompts "
        "are cut by --truncation",
    )
    p.add_argument(
        "--truncation",
        default="left",
        choices=TRUNCATION_POLICIES,
        help="as in preprocessing: left/right cut the prompt, drop refuses the sequence",
    )
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument(
        "--max-batch-tokens",
        type=int,
        default=16384,
        help="padded tokens per micro-batch (rows x longest row)",
    )
    p.add_argument("--micro-batch-size", type=int, default=None, help="max rows per micro-batch")
    p.add_argument(
        "--params-dtype",
        choices=("auto", "bf16", "fp16", "fp32"),
        default="auto",
        help="compute dtype (auto: bf16 on CUDA, fp32 on CPU)",
    )


def add_critique_arguments(p: argparse.ArgumentParser) -> None:
    """Options for scoring with a critique model (its critiques are written first)."""
    g = p.add_argument_group("critique models")
    g.add_argument(
        "--critique-model",
        help="HF causal-LM export of a critique model: write a critique of each response "
        "first, then score prompt + response + critique",
    )
    g.add_argument(
        "--critique-prompt",
        help="the critique turn's text (default: the one the model was trained with, "
        "recorded in its reward convention)",
    )
    g.add_argument("--critique-max-new-tokens", type=int, default=256)
    g.add_argument("--critique-batch-size", type=int, default=16)
    g.add_argument("--critique-backend", default="transformers", choices=("transformers", "vllm"))


def open_critic(args: argparse.Namespace, info: RewardInfo, encoder: Encoder) -> Any:
    """The :class:`megarm.generate.CritiqueWriter` of ``--critique-model`` (``None``
    without one), asking with the recorded critique prompt unless one is given."""
    if not getattr(args, "critique_model", None):
        return None
    from megarm.generate import CritiqueWriter, GenerateError, Sampling

    prompt = args.critique_prompt or (info.convention or {}).get("critique_prompt")
    try:
        return CritiqueWriter(
            args.critique_model,
            prompt or DEFAULT_CRITIQUE_PROMPT,
            Sampling(max_new_tokens=args.critique_max_new_tokens),
            batch_size=args.critique_batch_size,
            backend=args.critique_backend,
            prompt_type=args.prompt_type,
            seq_length=encoder.seq_length,
            truncation=encoder.truncation,
        )
    except GenerateError as exc:
        raise ScoringError(str(exc)) from exc


def open_scorer(args: argparse.Namespace) -> tuple[Scorer, Encoder, RewardInfo]:
    """The model, its encoder and what it records, from :func:`add_model_arguments`.

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
    except BaseException:
        scorer.close()
        raise
    return scorer, encoder, info


def entry_point(
    parser: argparse.ArgumentParser,
    body: Any,
    argv: Sequence[str] | None,
    errors: tuple[type[BaseException], ...] = (ScoringError,),
) -> int:
    """What every scoring command line does: parse ``argv``, run ``body(args)``; exit
    status 0, or 2 with one ``error:`` line for a bad input or set-up (``errors``)."""
    args = parser.parse_args(argv)
    try:
        body(args)
    except errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and (unbiased, as OpenRLHF) standard deviation, clamped at 1e-8."""
    if len(values) < 2:
        raise ScoringError(f"reward statistics need at least 2 rewards, got {len(values)}")
    mean = math.fsum(values) / len(values)
    var = math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, max(math.sqrt(var), 1e-8)
