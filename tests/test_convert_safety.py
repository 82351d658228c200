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


# --------------------------------------------------------------------------- bad inputs
# (issue #25: a shape mismatch or a missing shard was the right message inside a
# 69-line traceback, exit 1; a tied config's own lm_head.weight was dropped unnamed)


@pytest.fixture(scope="module")
def sharded_causal(tmp_path_factory) -> Path:
    return make_hf(tmp_path_factory.mktemp("bad") / "hf", "causal", seed=4, max_shard_size="20KB")


def _variant(source: Path, out: Path, **config) -> Path:
    import json
    import shutil

    shutil.copytree(source, out)
    data = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**data, **config}))
    return out


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    return line


@pytest.mark.parametrize("change", ["head_dim", "num_attention_heads", "num_key_value_heads"])
def test_hf2mcore_shape_mismatch_is_one_error_line(sharded_causal, tmp_path, capsys, change):
    import json

    from ckpt_convert import hf2mcore

    hf = json.loads((sharded_causal / "config.json").read_text())
    heads = hf["num_attention_heads"]
    value = {"head_dim": 2 * hf["hidden_size"] // heads, "num_attention_heads": 2 * heads,
             "num_key_value_heads": heads}[change]  # fmt: skip
    load = _variant(sharded_causal, tmp_path / "in", **{change: value})
    save = tmp_path / "out"
    assert hf2mcore.main(["--load-dir", str(load), "--save-dir", str(save)]) == 2
    line = _one_error_line(capsys)
    assert "self_attn" in line and "the weights and config.json disagree" in line
    assert not save.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_hf2mcore_index_naming_a_missing_shard_is_one_error_line(sharded_causal, tmp_path, capsys):
    import json

    from ckpt_convert import hf2mcore

    load = _variant(sharded_causal, tmp_path / "in")
    index = json.loads((load / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[-1]
    (load / gone).unlink()
    assert hf2mcore.main(["--load-dir", str(load), "--save-dir", str(tmp_path / "out")]) == 2
    line = _one_error_line(capsys)
    assert gone in line and "do not exist" in line
    assert not (tmp_path / "out").exists()


def test_hf2mcore_keep_lm_head_names_a_tied_configs_own_lm_head(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from ckpt_convert import hf2mcore

    load = make_hf(tmp_path / "in", "causal", tied=True, seed=5)
    tensors = load_file(str(load / "model.safetensors"))
    assert "lm_head.weight" not in tensors  # transformers saves the tied head once
    same = {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"].clone()}
    save_file(same, str(load / "model.safetensors"), metadata={"format": "pt"})
    # The tied copy saved as well loses nothing: accepted.
    argv = ["--load-dir", str(load), "--keep-lm-head"]
    assert hf2mcore.main([*argv, "--save-dir", str(tmp_path / "ok")]) == 0
    capsys.readouterr()
    own = {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"] + 1}
    save_file(own, str(load / "model.safetensors"), metadata={"format": "pt"})
    assert hf2mcore.main([*argv, "--save-dir", str(tmp_path / "out")]) == 2
    line = _one_error_line(capsys)
    assert "lm_head.weight" in line and "tie_word_embeddings" in line
    assert not (tmp_path / "out").exists()
