"""The end-to-end demo, offline on CPU: ``python -m megarm.demo [--work-dir work/demo]``.

1. builds a Qwen2.5-compatible tokenizer offline and a tiny random-init
   ``Qwen2ForCausalLM`` HF checkpoint;
2. writes a synthetic preference dataset megarm generates: the chosen answer is a
   well-formed sentence, the rejected one the same words shuffled (word order,
   learnable by a tiny model), with separate train and held-out files;
3. runs the real user-facing tools: ``tools/preprocess_data.py``,
   ``ckpt_convert/hf2mcore.py``, training at TP=2 through ``torchrun``,
   ``ckpt_convert/mcore2hf.py``;
4. scores the held-out pairs with plain transformers
   ``AutoModelForSequenceClassification`` on ``apply_chat_template``'s output, with
   ``megarm.score``, and as chat text ending at ``<|im_end|>`` (OpenRLHF's form)
   through megarm's scoring core, and prints the accuracies (equal: every route reads
   the reward at the same token), the outputs and the plots.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from megarm.demo_common import (
    ROOT,
    build_hf_model,
    finish_work_dir,
    fresh_work_dir,
    master_port,
    run,
    step,
    write_pairs,
)


def chat(row: dict[str, str], side: str) -> list[dict[str, str]]:
    """One held-out pair's prompt and one of its answers, as chat messages."""
    return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row[side]}]


def score_with_transformers(model_dir: Path, pairs_file: Path) -> tuple[float, int]:
    """Held-out accuracy of the exported reward model in plain transformers, fed as
    RewardBench, TRL and vLLM feed it: ``tokenizer.apply_chat_template(messages)``."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    correct = total = 0
    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    with torch.no_grad():
        for i in range(0, len(rows), 32):
            batch = rows[i : i + 32]
            seqs = [tok.apply_chat_template(chat(row, side), tokenize=True, return_dict=True)
                    ["input_ids"] for row in batch for side in ("chosen", "rejected")]
            width = max(map(len, seqs))
            ids = torch.full((len(seqs), width), tok.pad_token_id)
            mask = torch.zeros_like(ids)
            for j, seq in enumerate(seqs):
                ids[j, : len(seq)] = torch.tensor(seq)
                mask[j, : len(seq)] = 1
            rewards = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
            chosen, rejected = rewards[0::2], rewards[1::2]
            correct += int((chosen > rejected).sum())
            total += len(batch)
    return correct / total, total


def score_chat_text(model_dir: Path, pairs_file: Path) -> float:
    """Held-out accuracy through megarm's scoring core fed chat text that ends at
    ``<|im_end|>`` (what OpenRLHF sends a remote reward model)."""
    from megarm.rewards.backends import HFScorer
    from megarm.rewards.encoding import build_encoder

    encoder = build_encoder(str(model_dir))
    scorer = HFScorer(str(model_dir))
    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    texts = [encoder.tokenizer.apply_chat_template(chat(row, side), tokenize=False)
             for row in rows for side in ("chosen", "rejected")]
    rewards = scorer.rewards([encoder.text(t.removesuffix("\n")) for t in texts])
    return sum(c > r for c, r in zip(rewards[0::2], rewards[1::2])) / len(rows)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", choices=("orm", "cloud"), default="orm",
                        help="orm: this demo; cloud: the critique reward model (CLoud) demo")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "work" / "demo")
    parser.add_argument("--train-pairs", type=int, default=3000)
    parser.add_argument("--heldout-pairs", type=int, default=400)
    parser.add_argument("--nproc", type=int, default=2, help="ranks (TP=2 needs 2)")
    parser.add_argument("--min-accuracy", type=float, default=0.9)
    parser.add_argument("overrides", nargs="*", help="extra section.key=value for training")
    return parser


def _summary(work: Path, started: float, count: int, accuracy: float, via_score: float,
             via_text: float, config: dict) -> None:
    """The three accuracies, what the export records, and where every output is."""
    print(f"\nheld-out accuracy (transformers AutoModelForSequenceClassification, {count} pairs): "
          f"{accuracy:.3f}")
    print(f"same pairs through megarm.score: {via_score:.3f}; as chat text ending at "
          f"<|im_end|> through megarm's scoring: {via_text:.3f}")
    print(f"export config.json: problem_type {config.get('problem_type')}, reward mean "
          f"{config.get('mean')}, std {config.get('std')}, sequences end with "
          f"{(config.get('reward_convention') or {}).get('sequence_end')!r}")
    print(f"total time {time.time() - started:.0f}s. Outputs in {work}:")
    for name, what in [
        ("tokenizer", "Qwen2.5-compatible tokenizer"), ("hf_base", "tiny HF Qwen2ForCausalLM"),
        ("data", "pairs (jsonl) and preprocessed .bin/.idx + stats.json"),
        ("mcore_base", "converted megatron-core checkpoint"), ("ckpt", "trained checkpoint"),
        ("logs", "metrics.jsonl, TensorBoard, curves.png, rewards_hist.png"),
        ("hf_rm", "exported HF reward model (Qwen2ForSequenceClassification)"),
    ]:
        print(f"  {work / name}: {what}")


def main(argv: list[str] | None = None) -> int:
    """Run every step; exit non-zero if held-out accuracy is below ``--min-accuracy``.
    ``--recipe cloud`` runs the critique reward model demo instead
    (:mod:`megarm.demo_cloud`)."""
    recipe = argparse.ArgumentParser(add_help=False)
    recipe.add_argument("--recipe", choices=("orm", "cloud"), default="orm")
    known, rest = recipe.parse_known_args(argv)
    if known.recipe == "cloud":
        from megarm.demo_cloud import main as cloud

        return cloud(rest)
    args = _parser().parse_args(argv)
    work = args.work_dir.resolve()
    fresh_work_dir(work)
    (work / "data").mkdir(parents=True)
    started = time.time()
    py = sys.executable

    with step("1/7 build a Qwen2.5-compatible tokenizer offline"):
        from megarm.data.tokenizer import build_qwen25_tokenizer

        build_qwen25_tokenizer(work / "tokenizer")
    with step("2/7 make a tiny random-init Qwen2ForCausalLM (HF format)"):
        build_hf_model(work / "hf_base", work / "tokenizer", seed=0)
    with step("3/7 write synthetic preference pairs (word order) for training and held-out"):
        write_pairs(work / "data" / "train.jsonl", args.train_pairs, seed=1)
        write_pairs(work / "data" / "heldout.jsonl", args.heldout_pairs, seed=2)
        print(f"    example: {(work / 'data' / 'heldout.jsonl').read_text().splitlines()[0]}")
    with step("4/7 preprocess the training pairs into .bin/.idx"):
        run([py, "tools/preprocess_data.py", "--input", work / "data" / "train.jsonl",
             "--output-prefix", work / "data" / "demo", "--tokenizer-name-or-path",
             work / "tokenizer", "--handler-name", "pairwise_messages", "--seq-length", "96",
             "--workers", "2", "--log-interval", "1000"])
    with step("5/7 convert the HF checkpoint to megatron-core (torch_dist)"):
        run([py, "ckpt_convert/hf2mcore.py", "--load-dir", work / "hf_base", "--save-dir",
             work / "mcore_base", "--params-dtype", "fp32"])
    with step(f"6/7 train the reward model at TP=2 with torchrun ({args.nproc} ranks)"):
        run([py, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
             "--master_port", master_port(), "-m", "megarm.train",
             "--config", "configs/orm_trainer_demo.yaml",
             f"model.hf_config={work / 'mcore_base'}", f"checkpoint.load={work / 'mcore_base'}",
             f"data.data_path={work / 'data' / 'demo'}",
             f"data.tokenizer_name_or_path={work / 'tokenizer'}",
             f"checkpoint.save={work / 'ckpt'}", f"logging.log_dir={work / 'logs'}",
             *args.overrides])
        run([py, "tools/plot_metrics.py", work / "logs"])
    with step("7/7 export to HF Qwen2ForSequenceClassification and score held-out pairs"):
        run([py, "ckpt_convert/mcore2hf.py", "--load-dir", work / "ckpt", "--save-dir",
             work / "hf_rm", "--tokenizer-model", work / "tokenizer"])
        heldout = work / "data" / "heldout.jsonl"
        run([py, "-m", "megarm.score", "--load", work / "hf_rm", "--input", heldout,
             "--output", work / "heldout_rewards.jsonl"])
        scored = [json.loads(line) for line in (work / "heldout_rewards.jsonl").open()]
        via_score = sum(r["chosen_reward"] > r["rejected_reward"] for r in scored) / len(scored)
        accuracy, count = score_with_transformers(work / "hf_rm", heldout)
        via_text = score_chat_text(work / "hf_rm", heldout)
        config = json.loads((work / "hf_rm" / "config.json").read_text())
        # The reward at <|im_end|> (generated sequences' end) against the trained one.
        run([py, "tools/measure_positions.py", "--model", work / "hf_rm", "--pairs", heldout])

    finish_work_dir()
    _summary(work, started, count, accuracy, via_score, via_text, config)
    if accuracy < args.min_accuracy:
        print(f"FAILED: accuracy {accuracy:.3f} < {args.min_accuracy}", file=sys.stderr)
        return 1
    if not via_score == via_text == accuracy:
        print("FAILED: the three scoring routes disagree (reward read at different tokens)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
