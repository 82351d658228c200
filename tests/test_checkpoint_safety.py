"""Checkpoints a hostile world cannot turn against the user (issue 14, items 7, 8, 9,
12, 13, 14): damaged files are named, crafted pickles never run, NaN weights stop
the load, a full disk leaves the previous checkpoint current, two runs never write
one directory, and a resume on other data is refused."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megarm.testing import run_distributed
from tests.helpers import tiny_config

ROOT = Path(__file__).resolve().parents[1]
BASE = (
    "training.global_batch_size=4",
    "training.micro_batch_size=2",
    "data.synthetic_num_pairs=32",
    "data.seq_length=16",
    "data.split=100,0,0",
    "logging.log_dir=null",
)


def _train(overrides: tuple[str, ...]) -> dict:
    from megarm import distributed
    from megarm.training.loop import Trainer

    cfg = tiny_config(*BASE, *overrides)
    distributed.init_from_config(cfg)
    trainer = Trainer(cfg)
    start = trainer.iteration
    try:
        trainer.train()
        return {"start": start, "losses": [h["loss"] for h in trainer.history]}
    except Exception as exc:  # noqa: BLE001 - the message is what the test checks
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        trainer.close()


def _trainer_error(overrides: tuple[str, ...]) -> str | None:
    """The error building a Trainer raises (None if it builds)."""
    from megarm import distributed
    from megarm.training.loop import Trainer

    cfg = tiny_config(*BASE, *overrides)
    distributed.init_from_config(cfg)
    try:
        Trainer(cfg).close()
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return None


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A run of 2 iterations saving both: iter_0000001 and iter_0000002."""
    root = tmp_path_factory.mktemp("ckpt") / "run"
    (out,) = run_distributed(
        _train, 1, ("training.train_iters=2", "checkpoint.save_interval=1", f"checkpoint.save={root}")
    )
    assert "error" not in out, out
    return root


def _copy(saved: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(saved, dest)
    return dest


def _open(load: str, verify: str) -> str | None:
    from megarm import distributed
    from megarm.checkpoint import load_model_weights
    from megarm.model.builder import build_model

    distributed.init(1, 1)
    model = build_model(tiny_config(*BASE))
    try:
        load_model_weights(load, model, verify=verify)
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return None


def _data_file(checkpoint: Path) -> Path:
    (path,) = sorted(checkpoint.glob("__0_*.distcp"))
    return path


# --------------------------------------------------------------------------- item 7


@pytest.mark.slow
def test_damaged_shard_is_named_and_nan_weights_stop_the_load(saved, tmp_path):
    from megarm.checkpoint.integrity import read_dcp_metadata

    run = _copy(saved, tmp_path)
    checkpoint = run / "iter_0000002"
    # 4 KB of 0xFF in the middle of the embedding's stored values (1,024 fp32 NaNs;
    # torch.save's zip framing sits at the ends of the item).
    metadata = read_dcp_metadata(checkpoint)
    (info,) = [v for k, v in metadata.storage_data.items() if k.fqn == "embedding.word_embeddings.weight"]
    data = checkpoint / info.relative_path
    raw = bytearray(data.read_bytes())
    start = info.offset + info.length // 2
    raw[start : start + 4096] = b"\xff" * 4096
    data.write_bytes(bytes(raw))
    (checksum,) = run_distributed(_open, 1, str(run), "checksum")
    assert checksum and "CheckpointCorruptError" in checksum
    assert data.name in checksum and "checksum" in checksum
    # Sizes alone cannot see it; the NaNs it made are named instead.
    (sizes,) = run_distributed(_open, 1, str(run), "size")
    assert sizes and "embedding.word_embeddings.weight (1024 of 16384 values are NaN" in sizes
    # The exporter refuses too, writing nothing.
    out = tmp_path / "hf"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "ckpt_convert/mcore2hf.py"), "--load-dir", str(run),
         "--save-dir", str(out)],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300,
    )
    assert proc.returncode == 2 and "is damaged" in proc.stderr and not out.exists()


def _load_nan_weights(load: str) -> str | None:
    """A checkpoint whose bytes are intact but whose weights are NaN (saved after a
    divergence): the load names the tensor."""
    from megarm import distributed
    from megarm.checkpoint import load_model_weights, save_checkpoint
    from megarm.model.builder import build_model

    distributed.init(1, 1)
    (model,) = build_model(tiny_config(*BASE))
    with torch.no_grad():
        model.decoder.final_layernorm.weight[:5] = float("nan")
    save_checkpoint(load, 1, [model], {"iteration": 1})
    try:
        load_model_weights(load, [model])
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return None


def test_non_finite_weights_are_refused_by_tensor_name(tmp_path):
    (message,) = run_distributed(_load_nan_weights, 1, str(tmp_path / "nan"))
    assert message and "CheckpointCorruptError" in message
    assert "decoder.final_layernorm.weight (5 of 64 values are NaN or inf)" in message


# --------------------------------------------------------------------------- item 8


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_crafted_metadata_never_runs(saved, tmp_path):
    run = _copy(saved, tmp_path)
    marker = tmp_path / "pwned"
    metadata = run / "iter_0000002" / ".metadata"
    metadata.write_bytes(pickle.dumps(_Exploit(str(marker))))
    (run / "iter_0000002" / "megarm_integrity.json").unlink()  # as if never written
    (message,) = run_distributed(_open, 1, str(run), "checksum")
    assert message and "CheckpointCorruptError" in message and ".metadata was refused" in message
    assert "posix.system is not allowed" in message or "system is not allowed" in message
    out = tmp_path / "hf"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "ckpt_convert/mcore2hf.py"), "--load-dir", str(run),
         "--save-dir", str(out)],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300,
    )
    assert proc.returncode == 2 and "refused" in proc.stderr
    assert not marker.exists(), "the crafted .metadata ran a command"


def _write_crafted_object(directory: str, marker: str) -> str | None:
    """A checkpoint whose ShardedObject (like rng_state) holds an exploit."""
    import io

    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import WriteItem, WriteItemType

    from megarm import distributed
    from megarm.checkpoint.integrity import check_safe_to_read
    from megarm.checkpoint.writer import Item, write_dcp

    distributed.init(1, 1)

    def payload() -> io.BytesIO:
        buffer = io.BytesIO()
        torch.save([_Exploit(marker)], buffer)
        buffer.seek(0)
        return buffer

    item = Item(WriteItem(index=MetadataIndex("rng_state/shard_0_1"), type=WriteItemType.BYTE_IO), payload)
    Path(directory).mkdir(parents=True)
    write_dcp(Path(directory), [item])
    try:
        check_safe_to_read(Path(directory))
    except Exception as exc:  # noqa: BLE001
        return str(exc)
    return None


def test_crafted_checkpoint_object_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    (message,) = run_distributed(_write_crafted_object, 1, str(tmp_path / "ck"), str(marker))
    assert message and "rng_state/shard_0_1" in message and "weights-only" in message
    assert not marker.exists()


# --------------------------------------------------------------------------- items 13, 14


def test_garbled_tracker_and_empty_directory_are_named(saved, tmp_path):
    from megarm.preflight import validate

    run = _copy(saved, tmp_path)
    (run / "latest_checkpointed_iteration.txt").write_text("12abc\n")
    issues = validate(tiny_config(f"checkpoint.load={run}"))
    assert [i.key for i in issues] == ["checkpoint.load"]
    assert "holds '12abc', not an iteration number" in issues[0].message
    assert "found: [1, 2]" in issues[0].message
    empty = tmp_path / "empty"
    empty.mkdir()
    (issue,) = validate(tiny_config(f"checkpoint.load={empty}"))
    assert issue.key == "checkpoint.load" and "holds no checkpoint" in issue.message


@pytest.mark.slow
def test_resume_on_other_data_is_refused_unless_asked(saved, tmp_path):
    run = _copy(saved, tmp_path)
    load = f"checkpoint.load={run}"
    (message,) = run_distributed(_trainer_error, 1, (load, "training.seed=99"))
    assert message and "CheckpointMismatchError" in message
    assert "training.seed=1234" in message and "training.seed=99" in message
    (ok,) = run_distributed(
        _trainer_error, 1, (load, "training.seed=99", "checkpoint.allow_data_change=true")
    )
    assert ok is None
    # Same shapes, other RoPE: named before any weight is read.
    (message,) = run_distributed(_trainer_error, 1, (load, "model.rotary_base=10000"))
    assert message and "model.rotary_base=1000000.0" in message and "model.rotary_base=10000" in message


# --------------------------------------------------------------------------- item 9: lock


def test_second_run_in_one_save_dir_is_refused(tmp_path):
    from megarm.checkpoint import CheckpointLockedError, RunLock

    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from megarm.checkpoint import RunLock; "
         f"RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CheckpointLockedError, match=rf"pid {holder.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    # Its owner is gone (killed): the lock is stale and taken over, with a note.
    lock = RunLock(tmp_path)
    note = lock.acquire()
    assert note and "no longer running" in note
    assert json.loads((tmp_path / ".megarm.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / ".megarm.lock").exists()


# --------------------------------------------------------------------------- item 12


def _save_into_full_disk(root: str, limit: int | None) -> dict:
    """Iteration 1 saves; then the filesystem is 'full' (a file-size limit, or a
    reported free space) and iteration 2's save must fail clearly."""
    import resource

    from megarm import distributed
    from megarm.checkpoint import save as checkpoint_save
    from megarm.training.loop import Trainer

    cfg = tiny_config(*BASE, "training.train_iters=2", "checkpoint.save_interval=1",
                      f"checkpoint.save={root}")
    distributed.init_from_config(cfg)
    trainer = Trainer(cfg)
    original = trainer.save

    def save_then_fill() -> None:
        if trainer.iteration == 2:
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
            else:
                checkpoint_save.disk_free_bytes = lambda path: 1000
        original()

    trainer.save = save_then_fill
    try:
        trainer.train()
    except Exception as exc:  # noqa: BLE001
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"error": None}


@pytest.mark.parametrize(
    "limit", [pytest.param(4096, marks=pytest.mark.slow), None], ids=["write-fails", "space-check"]
)
def test_full_disk_keeps_the_previous_checkpoint(tmp_path, limit):
    root = tmp_path / "run"
    (out,) = run_distributed(_save_into_full_disk, 1, str(root), limit)
    message = out["error"]
    assert message and "CheckpointWriteError" in message
    assert f"{root}" in message and "iteration 2" in message
    assert "the previous checkpoint (iteration 1) is intact" in message
    if limit is None:
        assert "not enough space" in message
    assert not list(root.glob("*.tmp")), "the partial save was left behind"
    assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert (root / "iter_0000001" / "megarm_integrity.json").is_file()


@pytest.mark.slow
def test_verify_command_names_a_damaged_file(saved, tmp_path):
    run = _copy(saved, tmp_path)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    ok = subprocess.run([sys.executable, "-m", "megarm.checkpoint", "verify", str(run)],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert ok.returncode == 0 and "intact" in ok.stdout and "iteration 2" in ok.stdout
    data = _data_file(run / "iter_0000002")
    data.write_bytes(data.read_bytes()[:-5])  # a shard cut by 5 bytes
    bad = subprocess.run([sys.executable, "-m", "megarm.checkpoint", "verify", str(run)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert bad.returncode == 2 and data.name in bad.stderr and "bytes" in bad.stderr


@pytest.mark.slow
def test_verify_refuses_a_checkpoint_without_its_manifest(saved, tmp_path):
    """Issue #25: a flipped byte plus a deleted manifest passed as 'intact (0 files)'."""
    run = _copy(saved, tmp_path)
    data = _data_file(run / "iter_0000002")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    (run / "iter_0000002" / "megarm_integrity.json").unlink()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "megarm.checkpoint", "verify", str(run)]
    bad = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert bad.returncode == 2 and "no integrity manifest" in bad.stderr
    assert "Traceback" not in bad.stderr
    unverified = subprocess.run([*cmd, "--allow-unverified"], capture_output=True, text=True,
                                env=env, cwd=ROOT, timeout=300)
    assert unverified.returncode == 0 and "only the pickles were checked" in unverified.stdout


def test_a_tracker_that_is_a_directory_is_refused_up_front(tmp_path):
    """Issue #25: training resumed past it and crashed at its first tracker rename."""
    from megarm.checkpoint.layout import TRACKER, CheckpointNotFoundError, resolve_checkpoint

    (tmp_path / "iter_0000001").mkdir()
    (tmp_path / TRACKER).mkdir()
    with pytest.raises(CheckpointNotFoundError, match="is not a file"):
        resolve_checkpoint(tmp_path)
