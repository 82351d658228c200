"""Every input format streams the same records; locations are line/row numbers."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from megarm.data.readers import InputError, iter_records, record_unit, resolve_inputs

ROWS = [{"q": f"question {i}", "n": i} for i in range(5)]


def parsed(records):
    return [
        (r.source, r.index, json.loads(r.payload) if isinstance(r.payload, bytes) else r.payload)
        for r in records
    ]


def test_jsonl_plain_gz_and_blank_lines(tmp_path):
    text = "\n".join(json.dumps(r) for r in ROWS[:2]) + "\n\n" + json.dumps(ROWS[2]) + "\n"
    (tmp_path / "a.jsonl").write_text(text)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(text.encode()))
    for name in ("a.jsonl", "b.jsonl.gz"):
        path = tmp_path / name
        assert record_unit(path) == "line"
        # the blank line 3 is skipped, the third record is on line 4
        assert parsed(iter_records([path])) == [(0, 1, ROWS[0]), (0, 2, ROWS[1]), (0, 4, ROWS[2])]


def test_json_array_and_json_lines_named_json(tmp_path):
    array = tmp_path / "arr.json"
    array.write_text("\ufeff" + json.dumps(ROWS, indent=1), encoding="utf-8")  # with a BOM
    assert record_unit(array) == "row"
    assert parsed(iter_records([array])) == [(0, i, r) for i, r in enumerate(ROWS)]
    lines = tmp_path / "lines.json.gz"
    lines.write_bytes(gzip.compress("\n".join(json.dumps(r) for r in ROWS).encode()))
    assert record_unit(lines) == "line"
    assert parsed(iter_records([lines])) == [(0, i + 1, r) for i, r in enumerate(ROWS)]


def test_broken_json_array_reports_the_element(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[{"q": "ok", "n": 0}, {"q": "broken", ')
    records = list(iter_records([path]))
    assert records[0].payload == {"q": "ok", "n": 0}
    assert records[1].index == 1 and isinstance(records[1].payload, bytes)
    with pytest.raises(ValueError):
        json.loads(records[1].payload)


def test_parquet_csv_arrow(tmp_path):
    table = pa.Table.from_pylist(ROWS)
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=2)
    with (
        pa.OSFile(str(tmp_path / "f.arrow"), "wb") as sink,
        pa.ipc.new_file(sink, table.schema) as w,
    ):
        w.write_table(table)
    with (
        pa.OSFile(str(tmp_path / "s.arrow"), "wb") as sink,
        pa.ipc.new_stream(sink, table.schema) as w,
    ):
        w.write_table(table)
    pcsv.write_csv(table, tmp_path / "c.csv")
    (tmp_path / "c2.csv.gz").write_bytes(gzip.compress((tmp_path / "c.csv").read_bytes()))
    for name in ("t.parquet", "f.arrow", "s.arrow"):
        assert parsed(iter_records([tmp_path / name])) == [(0, i, r) for i, r in enumerate(ROWS)]
    # CSV columns are read as text (numbers included)
    text_rows = [{"q": r["q"], "n": str(r["n"])} for r in ROWS]
    for name in ("c.csv", "c2.csv.gz"):
        assert parsed(iter_records([tmp_path / name])) == [
            (0, i, r) for i, r in enumerate(text_rows)
        ]


def test_resolve_file_dir_glob(tmp_path):
    for name in ("b.jsonl", "a.parquet", "sub/c.csv.gz", "notes.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("")
    expected = [tmp_path / "a.parquet", tmp_path / "b.jsonl", tmp_path / "sub" / "c.csv.gz"]
    assert resolve_inputs(str(tmp_path)) == expected
    assert resolve_inputs(str(tmp_path / "**" / "*.*")) == expected
    assert resolve_inputs(str(tmp_path / "b.jsonl")) == [tmp_path / "b.jsonl"]
    with pytest.raises(InputError, match="does not exist"):
        resolve_inputs(str(tmp_path / "missing.jsonl"))
    with pytest.raises(InputError, match="has no files ending in"):
        resolve_inputs(str(tmp_path / "*.txt"))
