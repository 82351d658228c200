"""The rule every command shares (issue #25), tested across them: an expected error is
one ``error: ...`` line and exit status 2, never a traceback; no command writes over
one of its inputs, symlinks and hard links resolved.

Each case is a subprocess that fails before any model loads (``--help``-level cost),
but there are 15 of them: about 4 min on the shared 2-core machine, so slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TINY = "configs/orm_trainer_tiny.yaml"

pytestmark = pytest.mark.slow


def _run(argv: list[str], **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    full.pop("MASTER_PORT", None)
    return subprocess.run(argv, cwd=ROOT, env=full, capture_output=True, text=True, timeout=120)


def assert_one_error_line(done: subprocess.CompletedProcess, *words: str) -> str:
    """Exit status 2, no traceback, exactly one line starting ``error:`` (the
    launcher prefixes its lines with ``[megarm]``)."""
    err = done.stderr
    assert done.returncode == 2, (done.returncode, err[-2000:])
    assert "Traceback" not in err, err[-3000:]
    lines = [x for x in err.splitlines() if x.removeprefix("[megarm] ").startswith("error:")]
    assert len(lines) == 1, err[-2000:]
    for word in words:  # a config's problems are listed under its error line
        assert word in lines[0] or word in err, (word, lines[0])
    return lines[0]


@pytest.fixture()
def records(tmp_path: Path) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    return path


def _missing(tmp_path: Path) -> str:
    return str(tmp_path / "does-not-exist")


def cases(tmp: Path, records: Path) -> dict[str, tuple[list[str], tuple[str, ...]]]:
    """Each command with an input it must refuse, and words its error line names."""
    missing = _missing(tmp)
    out = str(tmp / "out.jsonl")
    return {
        "preprocess": ([PY, "tools/preprocess_data.py", "--input", missing, "--output-prefix",
                        str(tmp / "data"), "--tokenizer-name-or-path", missing,
                        "--handler-name", "pairwise_messages"], ("does-not-exist",)),
        "config": ([PY, "-m", "megarm.config", "training.eval_iters=-1"],
                   ("invalid megarm config",)),
        "launcher config check": (["bash", "examples/rm/orm_trainer.sh", TINY, "optimizer.lr=-1"],
                                  ("optimizer.lr",)),
        "train": ([PY, "-m", "megarm.train", "optimizer.lr=-1"], ("optimizer.lr",)),
        "score": ([PY, "-m", "megarm.score", "--load", missing, "--input", str(records),
                   "--output", out], ("--load",)),
        "evaluate": ([PY, "-m", "megarm.evaluate", "--load", missing, "--data", str(records),
                      "--output", str(tmp / "r.json")], ("--load",)),
        "generate": ([PY, "-m", "megarm.generate", "--model", missing, "--input", str(records),
                      "--output", out], ("does-not-exist",)),
        "hf2mcore": ([PY, "ckpt_convert/hf2mcore.py", "--load-dir", missing, "--save-dir",
                      str(tmp / "mc")], ("does-not-exist",)),
        "mcore2hf": ([PY, "ckpt_convert/mcore2hf.py", "--load-dir", missing, "--save-dir",
                      str(tmp / "hf")], ("does-not-exist",)),
        "checkpoint verify": ([PY, "-m", "megarm.checkpoint", "verify", missing],
                              ("does-not-exist",)),
    }


NAMES = list(cases(Path("/x"), Path("/x/in.jsonl")))


@pytest.mark.parametrize("name", NAMES)
def test_an_expected_error_is_one_line_and_exit_2(name, tmp_path, records):
    argv, words = cases(tmp_path, records)[name]
    env = {"GPUS_PER_NODE": "2", "PYTHON": PY} if argv[0] == "bash" else {}
    assert_one_error_line(_run(argv, **env), *words)


def _links(source: Path) -> dict[str, Path]:
    """An output path that is ``source`` itself, a symlink to it and a hard link to it."""
    sym = source.with_name("sym-" + source.name)
    hard = source.with_name("hard-" + source.name)
    sym.symlink_to(source)
    os.link(source, hard)
    return {"same": source, "symlink": sym, "hard link": hard}


def _writers(records: Path, output: Path, tmp: Path) -> dict[str, list[str]]:
    missing = _missing(tmp)
    return {
        "score": [PY, "-m", "megarm.score", "--load", missing, "--input", str(records),
                  "--output", str(output)],
        "evaluate": [PY, "-m", "megarm.evaluate", "--load", missing, "--data", str(records),
                     "--output", str(output)],
        "generate": [PY, "-m", "megarm.generate", "--model", missing, "--input", str(records),
                     "--output", str(output), "--overwrite"],
    }


@pytest.mark.parametrize("command", ["score", "evaluate", "generate"])
def test_no_command_writes_over_its_input(command, tmp_path, records):
    before = records.read_bytes()
    for how, output in _links(records).items():
        argv = _writers(records, output, tmp_path)[command]
        line = assert_one_error_line(_run(argv))
        assert "input" in line or "benchmark" in line, (how, line)
        assert records.read_bytes() == before, how
        assert output.exists() and (how != "symlink" or output.is_symlink())


def test_preprocessing_never_replaces_its_input(tmp_path, rm_tokenizer):
    """The input hard-linked to the rejects file the run would write (its prefix
    owns ``<prefix>_rejects.jsonl``), replaced with --overwrite."""
    from megarm.data.outputs import rejects_path

    prefix = tmp_path / "data"
    records = Path(rejects_path(str(prefix)))
    records.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    before = records.read_bytes()
    for how, source in {"same": records, "hard link": tmp_path / "hard.jsonl",
                        "symlink": tmp_path / "sym.jsonl"}.items():
        if how == "hard link" and not source.exists():
            os.link(records, source)
        if how == "symlink" and not source.exists():
            source.symlink_to(records)
        done = _run([PY, "tools/preprocess_data.py", "--input", str(source), "--output-prefix",
                     str(prefix), "--tokenizer-name-or-path", str(rm_tokenizer),
                     "--handler-name", "pairwise_messages", "--overwrite"])
        assert_one_error_line(done, "input")
        assert records.read_bytes() == before, how


def test_score_on_a_tampered_or_crafted_checkpoint_is_one_error_line(rm_checkpoint, tmp_path, records):
    """Issue #25: megarm.score refused a damaged or crafted checkpoint correctly, but
    as a traceback with exit 1."""
    import pickle
    import shutil

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    flipped = shutil.copytree(rm_checkpoint, tmp_path / "flipped")
    (shard,) = list(flipped.glob("iter_*/*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    crafted = shutil.copytree(rm_checkpoint, tmp_path / "crafted")
    (common,) = list(crafted.glob("iter_*/common.pt"))
    common.write_bytes(pickle.dumps(Exploit()))
    for load, words in ((flipped, ("is damaged", "checksum")), (crafted, ("common.pt", "weights-only"))):
        done = _run([PY, "-m", "megarm.score", "--load", str(load), "--input", str(records),
                     "--output", str(tmp_path / f"{load.name}.jsonl")])
        assert_one_error_line(done, *words)
    assert not marker.exists()
