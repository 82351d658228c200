"""What the converters' command lines share: the tokenizer files they carry, the
dtype names, the staged output directory (a temporary name, renamed when
complete), the closing time and memory report, and the entry-point wrapper (CPU
only, logging, exit status 2 with a one-line ``error:`` for a bad input)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from megarm.cli import run_command
from megarm.data.integrity import tokenizer_problem as size_problem
from megarm.data.tokenizer import TokenizerError, load_tokenizer, vocab_sha256
from megarm.platform.host import peak_rss_bytes

# Files a Hugging Face tokenizer directory may hold; copied next to the weights.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def has_tokenizer(directory: Path) -> bool:
    """Whether ``directory`` holds any Hugging Face tokenizer file."""
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


def copy_tokenizer(source: Path, out: Path) -> list[str]:
    """Copy the tokenizer files of ``source`` into ``out``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
            copied.append(name)
    return copied


def tokenizer_problem(
    directory: Path, vocab_size: int, reference: Path | None = None
) -> str | None:
    """Why the tokenizer in ``directory`` must not be copied next to a model with
    ``vocab_size`` embeddings: it has more tokens than the model, or its vocabulary
    differs from the tokenizer already beside the weights in ``reference`` (the one
    hf2mcore copied from the HF model). ``None`` when it fits."""
    try:
        tokenizer = load_tokenizer(str(directory))
    except TokenizerError as exc:
        return str(exc)
    if problem := size_problem(tokenizer, vocab_size, str(directory)):
        return problem
    if reference is not None and has_tokenizer(reference):
        if Path(reference).resolve() == Path(directory).resolve():
            return None
        theirs = load_tokenizer(str(reference))
        if vocab_sha256(theirs) != vocab_sha256(tokenizer):
            return (
                f"tokenizer {directory} ({len(tokenizer)} tokens) has another vocabulary than "
                f"the tokenizer beside the weights in {reference} ({len(theirs)} tokens); "
                "the model was made with that one: pass it, or leave --tokenizer-model out"
            )
    return None


def save_dir_problem(load_dir: str | Path, save_dir: str | Path) -> str | None:
    """Why ``save_dir`` must not be written when reading ``load_dir``, or ``None``.

    Writing (and ``--overwrite`` removing) a directory that is, contains or lies
    inside the input would destroy the input; symlinks are resolved first.
    """
    load, save = Path(load_dir).resolve(), Path(save_dir).resolve()
    if save == load:
        relation = "is"
    elif load in save.parents:
        relation = "lies inside"
    elif save in load.parents:
        relation = "contains"
    else:
        return None
    return (
        f"--save-dir {save_dir} {relation} --load-dir {load_dir} ({load}); writing it would "
        "destroy the input: choose a directory outside it"
    )


@contextlib.contextmanager
def staged_output(save: Path) -> Iterator[Path]:
    """A temporary directory beside ``save`` to write into; renamed to ``save`` (an
    existing one replaced: callers refuse that without ``--overwrite`` first) when the
    block completes, removed when it fails, so ``save`` is never partial."""
    save.parent.mkdir(parents=True, exist_ok=True)
    tmp = save.with_name(f".{save.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if save.exists():
            shutil.rmtree(save)
        os.replace(tmp, save)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def report(log: logging.Logger, done: str, started: float) -> None:
    """``<done> in <s>s (peak RSS <MiB>)``: the closing line of a converter."""
    log.info(
        "%s in %.1fs (peak RSS %.0f MiB)",
        done,
        time.perf_counter() - started,
        peak_rss_bytes() / 2**20,
    )


def run(
    log: logging.Logger,
    parser: argparse.ArgumentParser,
    body: Callable[[argparse.Namespace], Any],
    errors: tuple[type[BaseException], ...],
    argv: Sequence[str] | None = None,
) -> int:
    """Parse ``argv``, run ``body`` on the CPU; 0, or 2 with ``error: ...`` for ``errors``."""
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)

    def on_cpu(args: argparse.Namespace) -> Any:
        # Conversion is data movement: keep megarm (and megatron-core) on the CPU even
        # on a GPU machine.
        os.environ["MEGARM_DEVICE"] = "cpu"
        return body(args)

    return run_command(parser, on_cpu, argv, errors)
