"""Training-side data glue: the pad id comes from the dataset's stats.json."""

from __future__ import annotations

import json

from megarm.config import load_config
from megarm.training.data import build_datasets, pad_token_id


def test_pad_id_read_from_stats_json(tmp_path):
    prefix = tmp_path / "hh"
    stats = {"tokenizer": {"name_or_path": "x", "pad_token_id": 151643}}
    (tmp_path / "hh_stats.json").write_text(json.dumps(stats))
    assert pad_token_id(load_config(None, [f"data.data_path={prefix}"])) == 151643
    assert pad_token_id(load_config(None, [])) == 0


def test_synthetic_splits_follow_the_split_string():
    cfg = load_config(None, ["data.synthetic_num_pairs=100", "data.split=90,10,0",
                             "model.vocab_size=256"])
    data = build_datasets(cfg)
    assert (len(data.train), len(data.valid)) == (90, 10)
    assert data.valid[0]["chosen_input_ids"].tolist() != data.train[0]["chosen_input_ids"].tolist()
