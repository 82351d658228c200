"""Rewards that do not move with how they are read (issue 24, section 2): the same
texts give the same rewards (fp32, 1e-5) in batches of 1 and of 32, in sorted and
unsorted input order, through ``megarm.score`` (HF export and megarm checkpoint), and
left- or right-padded through transformers on the export (RewardBench's results moved
with batch size and padding side: allenai/reward-bench #137, #154).

The tolerance is 1e-5 relative to the reward (``1e-5 * max(1, |r|)``): a batch of 32
pads to its longest row, and fp32 attention over a wider masked row sums in another
order (measured: 1.2e-5 on a reward of 2.9, 4e-6 of it); a reward read at another
token, or pads attended, moves it by 1e-2 or more."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from megarm.demo_common import make_pair
from megarm.score import main as score_main
from megarm.testing import run_distributed

RTOL = 1e-5


def close(a: float, b: float) -> bool:
    return abs(a - b) <= RTOL * max(1.0, abs(b))


def ragged_pairs(count: int = 40, seed: int = 11) -> list[dict]:
    """Demo pairs with prompts of very different lengths (1 to 40 extra words), so
    batches of 32 pad a lot and sorting by length reorders them."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        row = make_pair(rng)
        extra = " ".join(rng.choice(["please", "kindly", "now", "briefly"]) for _ in range(rng.randint(1, 40)))
        rows.append({**row, "prompt": f"{row['prompt']} {extra} ({i})"})
    return rows


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def key(row: dict) -> str:
    return row["prompt"]


def score_routes(load: str, tmp: str, rows: list[dict], extra: list[str]) -> dict[str, dict[str, tuple]]:
    """route -> prompt -> (chosen, rejected) rewards for: batches of 1 and of 32, input
    sorted by length, shuffled, as given."""
    tmp_path = Path(tmp)
    shuffled = rows[:]
    random.Random(3).shuffle(shuffled)
    by_length = sorted(rows, key=lambda r: len(r["prompt"]))
    routes = {
        "batch1": (rows, ["--micro-batch-size", "1"]),
        "batch32": (rows, ["--micro-batch-size", "32", "--max-batch-tokens", "100000"]),
        "sorted": (by_length, ["--micro-batch-size", "32", "--max-batch-tokens", "100000"]),
        "shuffled": (shuffled, []),
    }
    out = {}
    for name, (order, args) in routes.items():
        data, result = write(tmp_path / f"{name}.jsonl", order), tmp_path / f"{name}-out.jsonl"
        assert score_main(["--load", load, "--input", str(data), "--output", str(result),
                           "--params-dtype", "fp32", *args, *extra]) == 0
        lines = [json.loads(x) for x in result.read_text().splitlines()]
        out[name] = {key(r): (o["chosen_reward"], o["rejected_reward"])
                     for r, o in zip(order, lines, strict=True)}
    return out


def check_routes(found: dict[str, dict[str, tuple]]) -> float:
    reference = found["batch1"]
    worst = 0.0
    for name, rewards in found.items():
        assert rewards.keys() == reference.keys(), name
        for prompt, pair in rewards.items():
            delta = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(pair, reference[prompt], strict=True))
            worst = max(worst, delta)
            assert delta <= RTOL, (name, prompt, pair, reference[prompt])
    spread = [c - r for c, r in reference.values()]
    assert max(map(abs, spread)) > 0.1, "rewards too alike to tell a mix-up"
    return worst


def test_megarm_score_of_an_export_ignores_batch_size_and_order(rm_export, tmp_path):
    found = score_routes(str(rm_export), str(tmp_path), ragged_pairs(), [])
    print(f"largest |reward - batch-of-1 reward| / max(1, |r|) over 4 routes: {check_routes(found):.2e}")


def _score_checkpoint(load: str, tmp: str, rows: list[dict]) -> dict:
    return score_routes(load, tmp, rows, [])


@pytest.mark.slow
def test_megarm_score_of_a_checkpoint_ignores_batch_size_and_order(rm_checkpoint, tmp_path):
    (found,) = run_distributed(_score_checkpoint, 1, str(rm_checkpoint), str(tmp_path), ragged_pairs())
    check_routes(found)


def test_the_export_gives_the_same_rewards_left_or_right_padded(rm_export):
    """transformers on the export, as RewardBench runs it: a batch padded on either side
    gives each text's unpadded reward."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(rm_export))
    model = AutoModelForSequenceClassification.from_pretrained(str(rm_export), dtype=torch.float32).eval()
    texts = []
    for row in ragged_pairs(16):
        for side in ("chosen", "rejected"):
            messages = [{"role": "user", "content": row["prompt"]},
                        {"role": "assistant", "content": row[side]}]  # fmt: skip
            texts.append(tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
    with torch.no_grad():
        alone = torch.cat([model(input_ids=torch.tensor([ids])).logits[:, 0] for ids in texts])
        for side in ("right", "left"):
            tok.padding_side = side
            batch = tok.pad({"input_ids": texts}, return_tensors="pt")
            assert (batch["attention_mask"] == 0).any()
            got = model(**batch).logits[:, 0]
            assert all(map(close, got.tolist(), alone.tolist())), (side, (got - alone).abs().max())
    assert (alone[0::2] - alone[1::2]).abs().max() > 0.1
