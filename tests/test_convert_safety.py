"""The converters never write over their input (issue 14, item 1)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.test_convert import make_hf


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return make_hf(tmp_path_factory.mktemp("safety") / "hf", "seq", seed=3)


def _targets(load: Path) -> dict[str, Path]:
    """Save dirs that are, lie inside, link to, or contain ``load``."""
    link = load.parent / f"{load.name}-link"
    if not link.exists():
        os.symlink(load, link)
    return {"same": load, "inside": load / "out", "symlink": link, "parent": load.parent}


def test_hf2mcore_refuses_a_save_dir_overlapping_the_input(hf_dir, capsys):
    from ckpt_convert import hf2mcore

    before = _snapshot(hf_dir)
    for name, save in _targets(hf_dir).items():
        argv = ["--load-dir", str(hf_dir), "--save-dir", str(save), "--overwrite"]
        assert hf2mcore.main(argv) == 2, name
        err = capsys.readouterr().err
        assert "would destroy the input" in err and "--save-dir" in err, (name, err)
        assert _snapshot(hf_dir) == before, name
    assert not (hf_dir / "out").exists()


def test_mcore2hf_refuses_a_save_dir_overlapping_the_checkpoint(tmp_path, capsys):
    from ckpt_convert import mcore2hf

    ckpt = tmp_path / "ckpt"
    (ckpt / "iter_0000002").mkdir(parents=True)
    (ckpt / "iter_0000002" / "common.pt").write_bytes(b"weights")
    (ckpt / "latest_checkpointed_iteration.txt").write_text("2\n")
    before = _snapshot(ckpt)
    cases = {**_targets(ckpt), "checkpoint root of an iteration": ckpt}
    for name, save in cases.items():
        load = ckpt / "iter_0000002" if name.startswith("checkpoint") else ckpt
        argv = ["--load-dir", str(load), "--save-dir", str(save), "--overwrite"]
        assert mcore2hf.main(argv) == 2, name
        err = capsys.readouterr().err
        assert "would destroy the input" in err, (name, err)
        assert _snapshot(ckpt) == before, name


# --------------------------------------------------------------------------- tokenizers
# (issue 14 item 4: the tokenizer files copied into a converted model must be the
# model's; rm_* are the session fixtures of tests/conftest.py)


@pytest.fixture(scope="module")
def extra_token_tokenizer(rm_tokenizer, tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(rm_tokenizer))
    tokenizer.add_tokens(["<|my_new_token|>"])
    out = tmp_path_factory.mktemp("extra_token")
    tokenizer.save_pretrained(str(out))
    return out


@pytest.mark.slow
def test_mcore2hf_refuses_a_tokenizer_the_model_was_not_made_with(
    rm_checkpoint, extra_token_tokenizer, tmp_path, capsys
):
    from ckpt_convert import mcore2hf

    out = tmp_path / "hf"
    argv = ["--load-dir", str(rm_checkpoint), "--save-dir", str(out),
            "--tokenizer-model", str(extra_token_tokenizer)]
    assert mcore2hf.main(argv) == 2
    err = capsys.readouterr().err
    assert "(151666 tokens) has another vocabulary than the tokenizer beside the weights" in err
    assert not out.exists()


def test_hf2mcore_refuses_a_tokenizer_larger_than_the_model(rm_tokenizer, tmp_path, capsys):
    from ckpt_convert import hf2mcore
    from tests.test_convert import _fake_hf_dir

    hf_dir = _fake_hf_dir(tmp_path / "hf", vocab_size=1024)
    argv = ["--load-dir", str(hf_dir), "--save-dir", str(tmp_path / "out"),
            "--tokenizer-model", str(rm_tokenizer)]
    assert hf2mcore.main(argv) == 2
    err = capsys.readouterr().err
    assert "has 151665 tokens but the model's vocab_size is 1024" in err
