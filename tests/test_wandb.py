"""Weights & Biases beside TensorBoard (logging.wandb_*): the writer's calls against a
stand-in module (always), and a real offline run read back from its file (when the
optional wandb package is installed)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from megarm.config import LoggingConfig
from megarm.training.metrics import MetricsWriter

METRICS = [("train", 1, {"loss": 0.7, "accuracy": 0.5, "nan": float("nan")}),
           ("train", 2, {"loss": 0.6, "accuracy": 0.75}),
           ("valid", 2, {"loss": 0.65})]


def write(log_dir: Path, logging: LoggingConfig, enabled: bool = True) -> MetricsWriter:
    writer = MetricsWriter(str(log_dir), enabled, tensorboard=False)
    writer.start_wandb(logging, {"training": {"seed": 7}})
    for split, iteration, metrics in METRICS:
        writer.log(split, iteration, metrics, total_iters=2)
    return writer


def test_writer_sends_every_finite_scalar_to_wandb(tmp_path, monkeypatch):
    calls: list[tuple] = []

    class Run:
        def log(self, data, step):
            calls.append(("log", data, step))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls.append(("init", kwargs)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    logging = LoggingConfig(log_dir=str(tmp_path), wandb_project="rm", wandb_name="run1",
                            wandb_mode="offline")
    write(tmp_path, logging).close()
    assert calls[0] == ("init", {"project": "rm", "entity": None, "name": "run1",
                                 "dir": str(tmp_path), "mode": "offline",
                                 "config": {"training": {"seed": 7}}})
    assert calls[1:] == [
        ("log", {"train/loss": 0.7, "train/accuracy": 0.5}, 1),  # NaN left out
        ("log", {"train/loss": 0.6, "train/accuracy": 0.75}, 2),
        ("log", {"valid/loss": 0.65}, 2),
        ("finish",),
    ]
    # Not the logging rank, or no project: wandb is never touched.
    calls.clear()
    write(tmp_path / "other", logging, enabled=False).close()
    write(tmp_path / "off", LoggingConfig(log_dir=str(tmp_path / "off"))).close()
    assert calls == []


def test_offline_run_records_the_metrics(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logging = LoggingConfig(log_dir=str(tmp_path), wandb_project="megarm-test",
                            wandb_mode="offline")
    write(tmp_path, logging).close()
    wandb.teardown()  # the run file is complete once wandb's service stops (at exit in a run)
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    rows = wandb_history(run_file)
    assert [(r["_step"], r.get("train/loss"), r.get("valid/loss")) for r in rows] == [
        (1, 0.7, None), (2, 0.6, 0.65)
    ]
    jsonl = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in jsonl] == [0.7, 0.6, 0.65]


def wandb_history(run_file: Path) -> list[dict]:
    """The metrics rows of an offline W&B run file, decoded with wandb's own protobuf
    messages (the file is wandb's record log: 7-byte header, 32 KiB blocks, records of
    crc32 + length + type + payload)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunk, rows = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or its last piece
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                             for i in record.history.item})
    return rows


