"""Critique generation with a critique model (CLoud's stage 2, and the first half of
scoring with a critique model).

:class:`CritiqueWriter` gives each response a critique: the model reads prompt +
response + the critique turn (:func:`megarm.data.templates.critique_turn`) and writes
until its end-of-turn token. The model is the HF ``*ForCausalLM`` export of a
critique model, run with transformers ``generate`` (greedy unless sampling,
left-padded batches) or vLLM when installed. ``python -m megarm.generate`` writes
them for a whole file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megarm.data.encoding import TRUNCATION_POLICIES, fit_prompt
from megarm.data.handlers import Messages
from megarm.data.templates import DEFAULT_CRITIQUE_PROMPT, critique_turn, get_template


class GenerateError(RuntimeError):
    """Generation cannot start or resume; the message says what to change."""


@dataclass(frozen=True)
class Sampling:
    """How critiques are decoded (recorded with a partial output)."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


class CritiqueWriter:
    """A critique model and its chat template: ``critiques(items)`` writes one
    critique per ``(prompt messages, response)``.

    ``model`` is an HF causal-LM directory (with its tokenizer, or ``tokenizer``
    given). Rows are built as preprocessing builds them: the templated prompt (cut
    by ``truncation`` so the row fits ``seq_length`` with ``max_new_tokens`` to
    spare), then the response and critique turn, tokenized separately."""

    def __init__(
        self,
        model: str,
        critique_prompt: str = DEFAULT_CRITIQUE_PROMPT,
        sampling: Sampling = Sampling(),
        batch_size: int = 16,
        backend: str = "transformers",
        prompt_type: str = "auto",
        tokenizer: str | None = None,
        seq_length: int | None = None,
        truncation: str = "left",
        dtype: str = "auto",
    ) -> None:
        from megarm.data.templates import TemplateError
        from megarm.data.tokenizer import TokenizerError, load_tokenizer

        if not (Path(model) / "config.json").is_file():
            raise GenerateError(f"--model {model} is not an HF model directory (no config.json)")
        try:
            self.tokenizer = load_tokenizer(tokenizer or model)
            self.template = get_template(prompt_type, self.tokenizer)
        except (TokenizerError, TemplateError) as exc:
            raise GenerateError(str(exc)) from exc
        if truncation not in TRUNCATION_POLICIES:
            raise GenerateError(f"--truncation {truncation!r}: choose from {TRUNCATION_POLICIES}")
        self.critique_prompt = critique_prompt
        self.sampling = sampling
        self.batch_size = batch_size
        self.truncation = truncation
        self.end_id = int(self.tokenizer.convert_tokens_to_ids(self.template.end_of_turn))
        self.header_len = len(self._ids([self.template.header])[0])
        config = json.loads((Path(model) / "config.json").read_text())
        self.seq_length = seq_length or config.get("max_position_embeddings")
        self.backend = backend
        if backend == "vllm":
            self._engine = _vllm_engine(model, dtype)
        elif backend == "transformers":
            self._engine = _transformers_model(model, dtype)
        else:
            raise GenerateError(f"--backend {backend!r}: choose transformers or vllm")

    def _ids(self, texts: list[str]) -> list[list[int]]:
        return [list(x) for x in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def prompt_ids(self, prompt: Messages, response: str) -> tuple[list[int], list[int]]:
        """``(prompt ids, response + critique turn ids)`` the critique is written after
        (and that scoring puts before it), the prompt cut as preprocessing cuts it."""
        head, rest = critique_turn(self.template, prompt, response, self.critique_prompt)
        head_ids, rest_ids = self._ids([head, rest])
        budget = len(rest_ids) + self.sampling.max_new_tokens
        head_ids, _ = fit_prompt(head_ids, budget, self.seq_length, self.header_len, self.truncation)
        return head_ids, rest_ids

    def critiques(self, items: Sequence[tuple[Messages, str]]) -> list[str]:
        """One critique per ``(prompt, response)``, in order."""
        rows = [sum(self.prompt_ids(prompt, response), []) for prompt, response in items]
        out: list[str] = []
        for start in range(0, len(rows), self.batch_size):
            out += self._generate(rows[start : start + self.batch_size])
        return out

    def _generate(self, rows: list[list[int]]) -> list[str]:
        s = self.sampling
        if self.backend == "vllm":
            from vllm import SamplingParams

            params = SamplingParams(
                max_tokens=s.max_new_tokens,
                temperature=s.temperature if s.do_sample else 0.0,
                top_p=s.top_p if s.do_sample else 1.0,
                seed=s.seed,
                stop_token_ids=[self.end_id],
            )
            prompts = [{"prompt_token_ids": row} for row in rows]
            return [r.outputs[0].text for r in self._engine.generate(prompts, params, use_tqdm=False)]
        import torch

        model = self._engine
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.end_id
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):  # left padding: every row ends where generation starts
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
        extra = {"temperature": s.temperature, "top_p": s.top_p} if s.do_sample else {}
        with torch.no_grad():
            out = model.generate(
                input_ids=ids.to(model.device),
                attention_mask=mask.to(model.device),
                max_new_tokens=s.max_new_tokens,
                do_sample=s.do_sample,
                eos_token_id=self.end_id,
                pad_token_id=pad,
                **extra,
            )
        texts = []
        for new in out[:, width:].tolist():
            if self.end_id in new:
                new = new[: new.index(self.end_id)]
            texts.append(self.tokenizer.decode(new, skip_special_tokens=False))
        return texts


def _transformers_model(model: str, dtype: str) -> Any:
    from transformers import AutoModelForCausalLM

    from megarm import platform

    return AutoModelForCausalLM.from_pretrained(model, dtype=platform.dtype(dtype)).to(platform.device()).eval()


def _vllm_engine(model: str, dtype: str) -> Any:
    try:
        from vllm import LLM
    except ImportError as exc:
        raise GenerateError(
            f"--backend vllm needs vLLM ({exc}); pip install vllm, or use --backend transformers"
        ) from exc
    return LLM(model=model, dtype={"auto": "auto", "bf16": "bfloat16", "fp32": "float32"}[dtype])
