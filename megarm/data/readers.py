"""Streaming iteration over raw preference records in jsonl/json/parquet/csv/arrow files.

Nothing here loads a whole file: JSON lines are read line by line (the raw bytes
are handed on, so a worker parses them and a malformed line is reported with its
line number), JSON arrays are decoded element by element, and the columnar formats
are read in record batches through pyarrow.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

SUPPORTED_SUFFIXES = (
    ".jsonl",
    ".jsonl.gz",
    ".json",
    ".json.gz",
    ".parquet",
    ".csv",
    ".csv.gz",
    ".arrow",
)
_BATCH_ROWS = 1024
# A JSON-array element that does not parse within this many characters is malformed
# (no real record is this large; it keeps a broken file from filling memory).
_MAX_JSON_ELEMENT = 64 << 20


class InputError(ValueError):
    """The input is missing or unreadable; the message names the path."""


class RawRecord(NamedTuple):
    """One record as read: ``payload`` is the raw line (bytes, jsonl) or a dict.

    ``index`` is the 1-based line number for JSON lines and the 0-based row (element)
    index for every other format; ``unit`` says which.
    """

    source: int
    index: int
    payload: bytes | dict[str, Any]


def _suffix(path: str | Path) -> str | None:
    name = str(path).lower()
    return next(
        (s for s in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True) if name.endswith(s)), None
    )


def resolve_inputs(spec: str) -> list[Path]:
    """Files named by ``spec``: one file, a directory (searched recursively for the
    supported suffixes) or a glob. Sorted, so the order (and the output) is stable."""
    if not spec:
        raise InputError("no input given: pass --input FILE|DIR|GLOB")
    path = Path(spec).expanduser()
    if path.is_file():
        candidates = [path]
    elif path.is_dir():
        candidates = [p for p in path.rglob("*") if p.is_file()]
    elif glob.has_magic(spec):
        candidates = [Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True)]
        candidates = [p for p in candidates if p.is_file()]
    else:
        raise InputError(f"input {spec!r} does not exist")
    files = sorted(p for p in candidates if _suffix(p))
    if not files:
        raise InputError(f"input {spec!r} has no files ending in {', '.join(SUPPORTED_SUFFIXES)}")
    return files


def record_unit(path: Path) -> str:
    """``"line"`` for JSON lines (1-based line numbers), ``"row"`` otherwise (0-based)."""
    return "line" if _is_json_lines(path) else "row"


def _open_text_bytes(path: Path) -> Any:
    return gzip.open(path, "rb") if str(path).lower().endswith(".gz") else open(path, "rb")


def _is_json_lines(path: Path) -> bool:
    suffix = _suffix(path)
    if suffix in (".jsonl", ".jsonl.gz"):
        return True
    if suffix not in (".json", ".json.gz"):
        return False
    # A .json file is JSON lines unless its first non-blank character opens an array.
    with _open_text_bytes(path) as handle:
        while chunk := handle.read(4096):
            stripped = chunk.lstrip(b"\xef\xbb\xbf \t\r\n")  # a UTF-8 BOM, then whitespace
            if stripped:
                return stripped[:1] != b"["
    return True


def _iter_json_lines(path: Path, source: int) -> Iterator[RawRecord]:
    with _open_text_bytes(path) as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():  # blank lines are not records
                yield RawRecord(source, number, line)


def _iter_json_array(path: Path, source: int) -> Iterator[RawRecord]:
    """Decode ``[{...}, {...}]`` one element at a time with a growing read buffer."""
    decoder = json.JSONDecoder()
    with (
        gzip.open(path, "rt", encoding="utf-8-sig")
        if str(path).lower().endswith(".gz")
        else open(path, encoding="utf-8-sig") as handle
    ):
        buffer = handle.read(1 << 16).lstrip()
        if not buffer.startswith("["):
            raise InputError(f"{path}: expected a JSON array")
        buffer, pos, index, eof = buffer[1:], 0, 0, False
        while True:
            # skip separators; stop at the closing bracket
            while pos < len(buffer) and buffer[pos] in " \t\r\n,":
                pos += 1
            if pos < len(buffer) and buffer[pos] == "]":
                return
            try:
                value, end = decoder.raw_decode(buffer, pos)
                # a number cut at the buffer's end still parses: read on to be sure
                complete = eof or end < len(buffer)
            except json.JSONDecodeError:
                if eof or len(buffer) - pos > _MAX_JSON_ELEMENT:
                    # Cannot resynchronise inside an array: hand the broken text on as
                    # raw bytes (reported as malformed_json at this element) and stop.
                    yield RawRecord(source, index, buffer[pos : pos + 4096].encode("utf-8"))
                    return
                complete = False
            if not complete:
                more = handle.read(max(1 << 16, len(buffer)))
                eof = not more
                buffer, pos = buffer[pos:] + more, 0
                continue
            yield RawRecord(source, index, value)
            index += 1
            pos = end
            if pos > (1 << 20):  # drop consumed text so memory stays bounded
                buffer, pos = buffer[pos:], 0


def _iter_batches(path: Path) -> Iterator[Any]:
    import pyarrow as pa

    suffix = _suffix(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from pq.ParquetFile(path).iter_batches(batch_size=_BATCH_ROWS)
    elif suffix == ".arrow":
        # Arrow IPC file format, or the stream format that `datasets` writes.
        source = pa.memory_map(str(path))
        try:
            reader = pa.ipc.open_file(source)
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)
        except pa.ArrowInvalid:
            source.seek(0)
            yield from pa.ipc.open_stream(source)
    else:  # csv / csv.gz
        import pyarrow.csv as pcsv

        # Read every column as text: type inference on the first block could
        # guess int for a text column and fail on a later block.
        with pa.input_stream(str(path), compression="detect") as stream:
            names = pcsv.open_csv(stream).schema.names
        convert = pcsv.ConvertOptions(
            column_types={name: pa.string() for name in names}, strings_can_be_null=False
        )
        with pa.input_stream(str(path), compression="detect") as stream:
            yield from pcsv.open_csv(stream, convert_options=convert)


def _iter_table(path: Path, source: int) -> Iterator[RawRecord]:
    index = 0
    for batch in _iter_batches(path):
        for row in batch.to_pylist():
            yield RawRecord(source, index, row)
            index += 1


def iter_records(paths: list[Path]) -> Iterator[RawRecord]:
    """Every record of every file, in order; ``source`` indexes ``paths``."""
    for source, path in enumerate(paths):
        if not path.is_file():
            raise InputError(f"input file {path} disappeared")
        try:
            if _is_json_lines(path):
                yield from _iter_json_lines(path, source)
            elif _suffix(path) in (".json", ".json.gz"):
                yield from _iter_json_array(path, source)
            else:
                yield from _iter_table(path, source)
        except InputError:
            raise
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise InputError(f"cannot read {path}: {exc}") from exc
