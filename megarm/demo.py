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
import os
import random
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ADJECTIVES = ("big small old young red green happy quiet brave lazy clever gentle "
              "tiny noisy proud calm bright dark warm cold").split()
NOUNS = ("cat dog bird horse farmer teacher child doctor king queen fox wolf bear "
         "student artist sailor baker driver rabbit lion").split()
VERBS = "sleeps sits waits stands plays reads sings dances rests hides".split()
PLACES = ("table tree house river bridge window door garden road hill").split()
PREPOSITIONS = "under near behind beside above".split()


def make_pair(rng: random.Random) -> dict[str, str]:
    """One preference pair: a sentence in order (chosen) vs its words shuffled."""
    adjective, noun = rng.choice(ADJECTIVES), rng.choice(NOUNS)
    words = ["the", adjective, noun, rng.choice(VERBS), rng.choice(PREPOSITIONS), "the",
             rng.choice(PLACES)]
    shuffled = words[:]
    while shuffled == words:
        rng.shuffle(shuffled)
    return {
        "prompt": f"Write a short sentence about a {noun}.",
        "chosen": " ".join(words) + ".",
        "rejected": " ".join(shuffled) + ".",
    }


def write_pairs(path: Path, count: int, seed: int) -> None:
    """``count`` pairs as JSON lines (distinct seeds give disjoint random streams)."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(count):
            fh.write(json.dumps(make_pair(rng)) + "\n")


@contextmanager
def step(title: str):
    """Print what a step does and how long it took."""
    print(f"\n==> {title}", flush=True)
    start = time.time()
    yield
    print(f"    done in {time.time() - start:.1f}s", flush=True)


def run(cmd: list[str], **kwargs) -> None:
    """Run a user-facing command, echoing it."""
    print("    $ " + " ".join(str(c) for c in cmd), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, check=True, **kwargs)


def build_hf_model(out: Path, tokenizer_dir: Path, seed: int) -> None:
    """A tiny random-init Qwen2ForCausalLM with Qwen2.5's vocabulary (tied embeddings
    like Qwen2.5-0.5B), saved with the tokenizer."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, Qwen2ForCausalLM

    from megarm.config import ModelConfig
    from megarm.families.qwen2 import QWEN2

    torch.manual_seed(seed)
    shape = ModelConfig(
        num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
        num_query_groups=2, vocab_size=151936, max_position_embeddings=512,
        rotary_base=1000000.0, norm_epsilon=1e-6, tie_word_embeddings=True,
    )
    keys = QWEN2.write(shape)  # the HF config keys, through the qwen2 family's table
    config = AutoConfig.for_model(
        keys.pop("model_type"), **keys, bos_token_id=151643, eos_token_id=151645
    )
    Qwen2ForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)


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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", choices=("orm", "cloud"), default="orm",
                        help="orm: this demo; cloud: the critique reward model (CLoud) demo")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "work" / "demo")
    parser.add_argument("--train-pairs", type=int, default=3000)
    parser.add_argument("--heldout-pairs", type=int, default=400)
    parser.add_argument("--nproc", type=int, default=2, help="ranks (TP=2 needs 2)")
    parser.add_argument("--min-accuracy", type=float, default=0.9)
    parser.add_argument("overrides", nargs="*", help="extra section.key=value for training")
    args = parser.parse_args(argv)
    work = args.work_dir.resolve()
    if work.exists():
        shutil.rmtree(work)
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
             "--master_port", os.environ.get("MASTER_PORT", "29531"), "-m", "megarm.train",
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
