"""What is checked before a step is taken, and what preprocessing owns (issue 14:
items 3, 4, 5, 6, and the preprocessing parts of 12 and 13)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megarm.config import ConfigError
from megarm.data.dataset import PairDataset, packed_path, stats_path
from megarm.data.preprocess import main as preprocess_main
from megarm.preflight import resolve

REPO = Path(__file__).resolve().parents[2]
WORDS = "the cat sat on a mat and then it ran far away from home".split()


def _rows(n: int, seed: int = 0, long_prompt: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    return [
        {
            "prompt": text(12 + long_prompt),
            "chosen": text(8),
            "rejected": text(10),
            "margin": round(rng.uniform(1, 3), 3),
        }
        for _ in range(n)
    ]


def _preprocess(rows: list[dict], prefix: Path, tokenizer: Path, *extra: str) -> int:
    source = prefix.parent / f"{prefix.name}.jsonl"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return preprocess_main([
        "--input", str(source), "--output-prefix", str(prefix), "--tokenizer-name-or-path",
        str(tokenizer), "--handler-name", "pairwise_messages", *extra,
    ])


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.endswith(".jsonl")
                  or p.name.endswith("_rejects.jsonl"))


@pytest.fixture(scope="module")
def data(tmp_path_factory, qwen_tokenizer_dir) -> dict[str, Path]:
    """Two preprocessed prefixes of the same 24 pairs: ``margin`` (with) and ``plain``."""
    root = tmp_path_factory.mktemp("checks")
    rows = _rows(24)
    out = {"root": root, "margin": root / "margin" / "d", "plain": root / "plain" / "d"}
    assert _preprocess(rows, out["margin"], qwen_tokenizer_dir, "--margin", "margin") == 0
    assert _preprocess(rows, out["plain"], qwen_tokenizer_dir) == 0
    return out


def _copy_prefix(source: Path, target: Path) -> str:
    shutil.copytree(source.parent, target.parent)
    return str(target.parent / source.name)


def _issues(prefix: str, *overrides: str) -> str:
    with pytest.raises(ConfigError) as caught:
        resolve(None, [f"data.data_path={prefix}", "model.max_position_embeddings=512",
                       "data.seq_length=512", *overrides])
    return str(caught.value)


# --------------------------------------------------------------------------- item 3


def test_an_existing_prefix_needs_overwrite_and_a_rerun_owns_exactly_its_files(
    tmp_path, qwen_tokenizer_dir, capsys
):
    prefix = tmp_path / "out" / "d"
    rows = _rows(6)
    assert _preprocess(rows, prefix, qwen_tokenizer_dir, "--margin", "margin") == 0
    before = {name: (prefix.parent / name).read_bytes() for name in _files(prefix.parent)}
    assert "d_packed_margin_document.bin" in before
    capsys.readouterr()

    assert _preprocess(rows, prefix, qwen_tokenizer_dir) == 2
    err = capsys.readouterr().err
    assert "already holds 12 file(s)" in err and "--overwrite" in err
    after = {name: (prefix.parent / name).read_bytes() for name in _files(prefix.parent)}
    assert after == before  # nothing touched

    assert _preprocess(rows, prefix, qwen_tokenizer_dir, "--overwrite") == 0
    stats = json.loads(Path(stats_path(str(prefix))).read_text())
    assert not stats["has_margin"]
    assert _files(prefix.parent) == sorted([*stats["files"], "d_stats.json"])
    assert not list(prefix.parent.glob("*margin*"))


def test_the_loader_reads_only_what_stats_json_lists(data, tmp_path):
    # A stale margin next to a prefix whose stats.json says has_margin: false (what a
    # re-run without --margin left behind before preprocessing removed stale files).
    prefix = _copy_prefix(data["plain"], tmp_path / "plain" / "d")
    for ext in (".bin", ".idx"):
        shutil.copy(packed_path(str(data["margin"]), "margin") + ext,
                    packed_path(prefix, "margin") + ext)
    dataset = PairDataset(prefix)
    assert not dataset.has_margin and {dataset[i]["margin"] for i in range(len(dataset))} == {0.0}
    assert PairDataset(str(data["margin"]))[0]["margin"] > 0.5

    # Data without stats.json (another tool) is found by glob, with a warning.
    os.remove(stats_path(prefix))
    with pytest.warns(UserWarning, match="stats.json is missing"):
        assert PairDataset(prefix).has_margin


def _first_losses(prefixes: list[str]) -> list[float]:
    """Iteration-1 loss of a fresh tiny model (same seed) on each prefix."""
    from megarm import distributed
    from megarm.training.loop import Trainer
    from tests.helpers import tiny_config

    losses = []
    for prefix in prefixes:
        cfg = tiny_config(
            f"data.data_path={prefix}", "model.vocab_size=151936", "model.num_layers=2",
            "model.max_position_embeddings=128", "data.seq_length=128", "data.split=100,0,0",
            "training.train_iters=1", "training.micro_batch_size=4",
            "training.global_batch_size=8", "logging.log_dir=null",
        )
        if not losses:
            distributed.init_from_config(cfg)
        distributed.set_seed(cfg.training.seed)  # the same initial weights each time
        losses.append(Trainer(cfg).train()["loss"])
    return losses


def test_a_stale_margin_file_does_not_change_the_loss(data, tmp_path):
    """The issue's repro: a margin file left by an earlier run beside a prefix whose
    stats.json says has_margin: false changed iteration 1's loss (5.085 vs 0.734)."""
    from megarm.testing import run_distributed

    stale = _copy_prefix(data["plain"], tmp_path / "stale" / "d")
    for ext in (".bin", ".idx"):
        shutil.copy(packed_path(str(data["margin"]), "margin") + ext,
                    packed_path(stale, "margin") + ext)
    prefixes = [str(data["plain"]), stale, str(data["margin"])]
    ((clean, with_stale, with_margin),) = run_distributed(_first_losses, 1, prefixes)
    assert with_stale == clean
    assert with_margin > clean + 0.5  # margins of 1-3 do move the loss


# --------------------------------------------------------------------------- item 4


def test_token_ids_beyond_the_models_vocabulary_are_refused(data):
    message = _issues(str(data["plain"]), "model.vocab_size=1024")
    largest = json.loads(Path(stats_path(str(data["plain"]))).read_text())["max_token_id"]
    assert largest == 151645  # <|im_end|>: recorded at preprocessing
    assert f"model.vocab_size: {data['plain']}_stats.json holds token id 151645" in message
    assert "model.vocab_size is 1024" in message


def test_megarm_train_stops_before_any_process_group(data, capsys):
    from megarm.train import main

    code = main([f"data.data_path={data['plain']}", "model.vocab_size=1024",
                 "model.max_position_embeddings=512", "data.seq_length=512"])
    assert code == 2 and "holds token id 151645" in capsys.readouterr().err


def test_old_stats_without_max_token_id_are_scanned(data, tmp_path):
    from megarm.training.data import check_vocabulary
    from tests.helpers import tiny_config

    prefix = _copy_prefix(data["plain"], tmp_path / "old" / "d")
    stats = json.loads(Path(stats_path(prefix)).read_text())
    del stats["max_token_id"]
    Path(stats_path(prefix)).write_text(json.dumps(stats))
    cfg = tiny_config(f"data.data_path={prefix}", "model.vocab_size=1024")
    with pytest.warns(UserWarning, match="no max_token_id"), pytest.raises(ConfigError) as caught:
        check_vocabulary(cfg)
    assert "holds token id 151645" in str(caught.value)


def test_a_tokenizer_other_than_the_datas_is_refused(data, qwen_tokenizer):
    import copy

    from megarm.training.data import check_vocabulary
    from tests.helpers import tiny_config

    base = [f"data.data_path={data['plain']}", "model.vocab_size=151936"]
    check_vocabulary(tiny_config(*base), qwen_tokenizer)  # the data's own tokenizer
    extra = copy.deepcopy(qwen_tokenizer)
    extra.add_tokens(["<|my_new_token|>"])
    with pytest.raises(ConfigError) as caught:
        check_vocabulary(tiny_config(*base), extra)
    assert "data.tokenizer_name_or_path:" in str(caught.value)
    assert "re-run tools/preprocess_data.py with this tokenizer" in str(caught.value)
    small = [f"data.data_path={data['plain']}", "model.vocab_size=151650"]
    with pytest.raises(ConfigError, match="has 151665 tokens but the model's vocab_size is 151650"):
        check_vocabulary(tiny_config(*small), qwen_tokenizer)


# --------------------------------------------------------------------------- item 5


def test_pairs_longer_than_seq_length_are_refused_with_counts(data):
    lengths = PairDataset(str(data["plain"]))
    longest = max(max(len(lengths[i]["chosen_input_ids"]), len(lengths[i]["rejected_input_ids"]))
                  for i in range(len(lengths)))
    message = _issues(str(data["plain"]), f"data.seq_length={longest - 1}")
    assert "data.seq_length: " in message and f"(longest {longest} tokens)" in message
    assert f"--seq-length {longest - 1}" in message and " of 24 pairs" in message
    resolve(None, [f"data.data_path={data['plain']}", f"data.seq_length={longest}",
                   "model.max_position_embeddings=512"])


def test_preprocessing_defaults_seq_length_to_the_models_limit(
    tmp_path, qwen_tokenizer_dir, capsys
):
    tokenizer = tmp_path / "model"
    shutil.copytree(qwen_tokenizer_dir, tokenizer)
    (tokenizer / "config.json").write_text(json.dumps({"max_position_embeddings": 48}))
    prefix = tmp_path / "out" / "d"
    assert _preprocess(_rows(3, long_prompt=60), prefix, tokenizer) == 0
    err = capsys.readouterr().err
    assert f"--seq-length not given: using 48 (max_position_embeddings in {tokenizer}" in err
    stats = json.loads(Path(stats_path(str(prefix))).read_text())
    assert stats["seq_length"] == 48 and stats["counts"]["truncated"] == 3
    assert stats["lengths"]["rejected"]["max"] == 48


def test_an_unset_model_max_length_is_no_limit(tmp_path, qwen_tokenizer_dir, capsys):
    from megarm.data.preprocess import default_seq_length

    class Tok:
        model_max_length = int(1e30)  # transformers' "unset"

    assert default_seq_length(str(tmp_path), Tok())[0] is None
    Tok.model_max_length = 131072  # Qwen2.5's tokenizer_config.json
    assert default_seq_length(str(tmp_path), Tok())[0] == 131072


# --------------------------------------------------------------------------- item 6


def test_a_cut_bin_is_refused_at_start_naming_the_file(data, tmp_path):
    prefix = _copy_prefix(data["plain"], tmp_path / "cut" / "d")
    path = packed_path(prefix, "rejected_labels") + ".bin"
    os.truncate(path, os.path.getsize(path) - 5)
    message = _issues(prefix)
    assert f"data.data_path: {path} has" in message and "is cut" in message
    done = subprocess.run([sys.executable, "-m", "megarm.config", f"data.data_path={prefix}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and path in done.stderr and "Traceback" not in done.stderr
    with pytest.raises(ValueError, match="rejected_labels_document.bin has"):
        PairDataset(prefix)


def test_files_from_other_data_with_the_same_pair_count_are_named(
    data, tmp_path, qwen_tokenizer_dir
):
    longer, same = tmp_path / "longer" / "d", tmp_path / "same" / "d"
    assert _preprocess(_rows(24, seed=9, long_prompt=2), longer, qwen_tokenizer_dir) == 0
    assert _preprocess(_rows(24, seed=9), same, qwen_tokenizer_dir) == 0
    prefix = _copy_prefix(data["plain"], tmp_path / "swap" / "d")
    wrong = packed_path(prefix, "chosen_labels")
    # The .idx of other pairs, then its .bin too: sizes, then stats.json's token count.
    for ext, message in ((".idx", wrong + ".bin has"), (".bin", wrong + ".idx has 1")):
        shutil.copy(packed_path(str(longer), "chosen_labels") + ext, wrong + ext)
        assert message in _issues(prefix)
        with pytest.raises(ValueError, match="belongs to"):
            PairDataset(prefix)
    # Other pairs of exactly the same lengths: their tokens differ.
    a, b = PairDataset(str(data["plain"])), PairDataset(str(same))
    assert [len(a[i]["chosen_labels"]) for i in range(24)] == [
        len(b[i]["chosen_labels"]) for i in range(24)
    ]
    for ext in (".bin", ".idx"):
        shutil.copy(packed_path(str(same), "chosen_labels") + ext, wrong + ext)
    assert f"{packed_path(prefix, 'chosen_input_ids')}.idx and {wrong}.idx hold different " \
        "tokens for pair 0" in _issues(prefix)


# --------------------------------------------------------------------------- items 12, 13


def test_disk_full_during_preprocessing_is_one_line_and_leaves_nothing(
    tmp_path, qwen_tokenizer_dir
):
    rows = _rows(100)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = (
        "import resource, signal, sys\n"
        "from megarm.data.preprocess import main\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4000, 4000))\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-c", code, "--input", str(tmp_path / "in.jsonl"), "--output-prefix",
         str(out / "d"), "--tokenizer-name-or-path", str(qwen_tokenizer_dir), "--handler-name",
         "pairwise_messages"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"no space left on {out}" in errors[0]
    assert list(out.iterdir()) == []


def test_a_read_only_output_prefix_is_one_line(tmp_path, qwen_tokenizer_dir, capsys, monkeypatch):
    from megarm.data.dataset import megatron_indexed_dataset

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    # Every file the run writes is opened by megatron-core's builder first.
    monkeypatch.setattr(megatron_indexed_dataset(), "open", read_only, raising=False)
    prefix = tmp_path / "ro" / "d"
    assert _preprocess(_rows(3), prefix, qwen_tokenizer_dir) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: --output-prefix {prefix}: cannot write to {prefix.parent}")
    assert "Read-only file system" in err and list(prefix.parent.iterdir()) == [
        prefix.parent / "d.jsonl"
    ]
