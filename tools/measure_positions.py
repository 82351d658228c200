"""How much an export's reward moves between the positions common tools read it at
(issue 24, section 1).

    python tools/measure_positions.py --model HF_DIR --pairs heldout.jsonl [--limit 400]

megarm trains the reward at the end of ``apply_chat_template``'s output (the export's
``reward_convention.sequence_end``, ``<|im_end|>\\n`` for ChatML); OpenRLHF and most
PPO/GRPO loops score generated sequences that end at the end-of-turn token
(``<|im_end|>``, no newline). This scores the held-out pairs at both positions with
plain transformers (fp32, one sequence at a time: no padding question) and prints
the accuracy at each, the mean |reward difference| between them and that as a share
of the rewards' standard deviation (the issue's bar: 5%). For a template whose
sequences end at the end-of-turn token (Llama 3) both positions are one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="HF reward model directory (an export)")
    p.add_argument("--pairs", type=Path, required=True, help="jsonl of {prompt, chosen, rejected}")
    p.add_argument("--limit", type=int, default=400, help="pairs to score (400)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    config = json.loads((args.model / "config.json").read_text())
    convention = config.get("reward_convention") or {}
    end_of_turn = convention.get("end_of_turn")
    if not end_of_turn:
        print(f"error: {args.model}/config.json records no reward_convention", file=sys.stderr)
        return 2
    tok = AutoTokenizer.from_pretrained(str(args.model))
    model = AutoModelForSequenceClassification.from_pretrained(str(args.model), dtype=torch.float32).eval()
    rows = [json.loads(x) for x in args.pairs.read_text().splitlines() if x.strip()][: args.limit]

    def reward(text: str) -> float:
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            return float(model(input_ids=ids).logits[0, 0])

    trained: list[float] = []
    at_end: list[float] = []
    for row in rows:
        for side in ("chosen", "rejected"):
            messages = [{"role": "user", "content": row["prompt"]},
                        {"role": "assistant", "content": row[side]}]  # fmt: skip
            text = tok.apply_chat_template(messages, tokenize=False)
            cut = text[: text.rindex(end_of_turn) + len(end_of_turn)]
            trained.append(reward(text))
            at_end.append(reward(cut))

    def accuracy(values: list[float]) -> float:
        return sum(c > r for c, r in zip(values[0::2], values[1::2], strict=True)) / len(rows)

    diff = statistics.fmean(abs(a - b) for a, b in zip(trained, at_end, strict=True))
    std = statistics.stdev(trained)
    figures = {
        "pairs": len(rows),
        "sequence_end": convention.get("sequence_end"),
        "end_of_turn": end_of_turn,
        "accuracy_template": accuracy(trained),
        "accuracy_end_of_turn": accuracy(at_end),
        "mean_abs_difference": diff,
        "reward_std": std,
        "difference_share_of_std": diff / std,
    }
    if args.json:
        print(json.dumps(figures))
    else:
        print(f"{len(rows)} pairs; trained at {figures['sequence_end']!r}, also read at {end_of_turn!r}")
        print(f"accuracy: apply_chat_template {figures['accuracy_template']:.4f}, ending at "
              f"end-of-turn {figures['accuracy_end_of_turn']:.4f}")
        print(f"mean |reward difference| {diff:.4f} = {diff / std:.1%} of the reward std {std:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
