"""What every command shares: the scoring options, and one way to fail.

:func:`run_command` parses the arguments, runs the command's body and turns a bad
input or set-up into one ``error: ...`` line and exit status 2; every ``python -m``
command, the converters and preprocessing go through it. The scoring commands
(``megarm.score``, ``serve``, ``evaluate``, ``reward_stats``) share
:func:`add_model_arguments` and turn it into a
:class:`~megarm.rewards.backends.ScorerSpec` with :func:`scorer_spec`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from megarm import platform  # noqa: F401  (first: quiets megatron-core's import-time warnings)
from megarm.data.encoding import TRUNCATION_POLICIES
from megarm.errors import ScoringError

EXIT_BAD_INPUT = 2
"""The exit status of a command refused for a bad input or set-up (argparse's own)."""


def fail(exc: BaseException | str) -> int:
    """Report a bad input or set-up: one ``error:`` line on stderr; the exit status."""
    # A message of several lines (torch's weights-only refusal, a config's problem
    # list) is still one line: a log reader or a script takes the first line only.
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    print(f"error: {text}", file=sys.stderr)
    return EXIT_BAD_INPUT


# Refusals of a checkpoint (damaged, crafted, missing, of another model) are bad
# inputs of every command that loads one; named by module so that commands which
# never load a checkpoint do not import torch to catch them.
CHECKPOINT_ERRORS = {
    "megarm.checkpoint.integrity": "CheckpointCorruptError",
    "megarm.checkpoint.layout": "CheckpointNotFoundError",
    "megarm.checkpoint.load": "CheckpointMismatchError",
}


def expected_errors(errors: tuple[type[BaseException], ...]) -> tuple[type[BaseException], ...]:
    """``errors`` and the checkpoint refusals of the checkpoint modules loaded so far
    (one that raised is loaded)."""
    found = [getattr(sys.modules[m], name) for m, name in CHECKPOINT_ERRORS.items() if m in sys.modules]
    return (*errors, *found)


def is_same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (symlinks and hard links resolved)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output(option: str, output: Path, inputs: Sequence[Path]) -> None:
    """Refuse, before any work, an output that is one of the inputs or cannot be
    written (``ScoringError`` naming ``option``)."""
    if any(is_same_file(output, source) for source in inputs):
        raise ScoringError(f"{option} {output} is an input file; write elsewhere")
    if output.is_dir():
        raise ScoringError(f"{option} {output} is a directory; name a file")
    if not output.parent.is_dir():
        raise ScoringError(f"{option} {output}: directory {output.parent} does not exist")
    probe = output.with_name(f".{output.name}.probe-{os.getpid()}")
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ScoringError(f"cannot write {option} {output}: {exc.strerror or exc}") from exc


def run_command(
    parser: argparse.ArgumentParser,
    body: Callable[[argparse.Namespace], Any],
    argv: Sequence[str] | None,
    errors: tuple[type[BaseException], ...] = (ScoringError,),
) -> int:
    """Parse ``argv``, run ``body(args)``; exit status 0, or 2 with one ``error:``
    line for a bad input or set-up (``errors``)."""
    args = parser.parse_args(argv)
    try:
        body(args)
    except BaseException as exc:
        if isinstance(exc, expected_errors(errors)):
            return fail(exc)
        raise
    return 0


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
        "--context-parallel-size",
        type=int,
        default=1,
        help="split every sequence over this many ranks (inputs too long for one device)",
    )
    p.add_argument(
        "--attribute-weights",
        help="a multi-attribute (regression) model's scalar reward: NAME=WEIGHT,... e.g. "
        "helpfulness=0.65,correctness=0.8 (attributes left out weigh 0; default: all 1)",
    )
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


def open_critic(args: argparse.Namespace, info: Any, encoder: Any) -> Any:
    """The :class:`megarm.generate.CritiqueWriter` of ``--critique-model`` (``None``
    without one), asking with the recorded critique prompt unless one is given."""
    if not getattr(args, "critique_model", None):
        return None
    from megarm.data.templates import DEFAULT_CRITIQUE_PROMPT
    from megarm.rewards.critique import CritiqueWriter, GenerateError, Sampling

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


def scorer_spec(args: argparse.Namespace) -> Any:
    """The :class:`~megarm.rewards.backends.ScorerSpec` of :func:`add_model_arguments`."""
    from megarm.rewards.backends import ScorerSpec

    return ScorerSpec(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ScorerSpec)})
