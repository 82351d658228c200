"""megarm.data.blend: parsing ``data_path`` blends and checking packed-file prefixes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from megarm.data.blend import REQUIRED_KEYS, packed_files, parse_data_path, prefix_problems


def _touch_prefix(prefix, keys=REQUIRED_KEYS, exts=(".bin", ".idx")) -> None:
    for key in keys:
        for ext in exts:
            open(f"{prefix}_packed_{key}_document{ext}", "wb").close()


# --------------------------------------------------------------------------- parse_data_path


def test_blend_weights_are_normalised():
    blend = parse_data_path("0.7 /data/a 0.3 /data/b")
    assert [prefix for _, prefix in blend] == ["/data/a", "/data/b"]
    assert [w for w, _ in blend] == pytest.approx([0.7, 0.3])
    blend = parse_data_path("3 A 1 B")
    assert [prefix for _, prefix in blend] == ["A", "B"]
    assert [w for w, _ in blend] == pytest.approx([0.75, 0.25])
    assert sum(w for w, _ in parse_data_path("1 a 1 b 2 c")) == pytest.approx(1.0)


def test_blend_keeps_order_and_accepts_a_token_list():
    assert parse_data_path(["1", "x", "1", "y"]) == [(0.5, "x"), (0.5, "y")]
    assert parse_data_path("  2   p/q \n 2 r ") == [(0.5, "p/q"), (0.5, "r")]


def test_single_prefix_has_weight_one():
    assert parse_data_path("/data/only") == [(1.0, "/data/only")]
    assert parse_data_path(["/data/only"]) == [(1.0, "/data/only")]


def test_odd_token_count_is_an_error():
    with pytest.raises(ValueError, match="weight/prefix pairs, got 3 items"):
        parse_data_path("0.5 A 0.5")


def test_non_numeric_weight_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"blend weight 'A' \(before B\) is not a number"):
        parse_data_path("A B")


@pytest.mark.parametrize("weight", ["0", "-0.5"])
def test_non_positive_weight_is_an_error(weight):
    with pytest.raises(ValueError, match="blend weight for B must be > 0"):
        parse_data_path(f"1 A {weight} B")


def test_empty_data_path_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        parse_data_path("   ")


# --------------------------------------------------------------------------- prefix checks


def test_complete_prefix_has_no_problems(tmp_path):
    prefix = str(tmp_path / "train")
    _touch_prefix(prefix)
    assert prefix_problems(prefix) == []
    files = packed_files(prefix)
    assert set(files) == set(REQUIRED_KEYS)
    assert files["chosen_labels"] == f"{prefix}_packed_chosen_labels_document"


def test_optional_margin_file_is_found(tmp_path):
    prefix = str(tmp_path / "train")
    _touch_prefix(prefix, REQUIRED_KEYS + ("margin",))
    assert prefix_problems(prefix) == []
    assert "margin" in packed_files(prefix)


def test_missing_key_is_named(tmp_path):
    prefix = str(tmp_path / "train")
    _touch_prefix(prefix, ("chosen_input_ids", "chosen_labels", "rejected_input_ids"))
    problems = prefix_problems(prefix)
    assert problems == [f"{prefix}: missing {prefix}_packed_rejected_labels_document.idx"]


def test_missing_bin_is_named(tmp_path):
    prefix = str(tmp_path / "train")
    _touch_prefix(prefix)
    (tmp_path / "train_packed_chosen_input_ids_document.bin").unlink()
    problems = prefix_problems(prefix)
    assert problems == [f"{prefix}: missing {prefix}_packed_chosen_input_ids_document.bin"]


def test_several_missing_keys_are_all_named(tmp_path):
    prefix = str(tmp_path / "train")
    _touch_prefix(prefix, ("chosen_input_ids",))
    problems = " ".join(prefix_problems(prefix))
    for key in ("chosen_labels", "rejected_input_ids", "rejected_labels"):
        assert f"_packed_{key}_document.idx" in problems
    assert "chosen_input_ids" not in problems


def test_other_prefix_in_same_dir_does_not_count(tmp_path):
    _touch_prefix(str(tmp_path / "other"))
    problems = prefix_problems(str(tmp_path / "train"))
    assert len(problems) == 1
    assert "no files" in problems[0] and "preprocess_data.py" in problems[0]


def test_prefix_in_missing_directory_says_so(tmp_path):
    prefix = str(tmp_path / "nowhere" / "train")
    (problem,) = prefix_problems(prefix)
    assert f"directory {tmp_path / 'nowhere'} does not exist" in problem


def test_prefix_with_glob_characters_is_matched_literally(tmp_path):
    prefix = str(tmp_path / "set[1]")
    _touch_prefix(prefix)
    assert prefix_problems(prefix) == []


def test_blend_module_does_not_import_torch():
    import subprocess

    code = (
        "import sys, megarm.data.blend as b; b.parse_data_path('1 a 1 b'); "
        "b.prefix_problems('/nonexistent/x'); assert 'torch' not in sys.modules, 'torch imported'"
    )
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert proc.returncode == 0, proc.stderr
