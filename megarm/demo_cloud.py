"""The critique reward model demo (CLoud), offline on CPU: ``python -m megarm.demo --recipe cloud``.

CLoud ("Critique-out-Loud") reward models write a critique of a response, then read
the reward at the end of it. The demo runs the three stages with megarm's commands:

1. **SFT on critiques**: synthetic pairs whose critique is a short deterministic
   sentence naming the defect of the response (the chosen sentence is correct; the
   rejected one has its words shuffled, a word repeated, is in capitals, or stops
   too early). Both sides become SFT records (prompt, response, critique turn ->
   critique), ``tools/preprocess_data.py --handler-name sft``, trained with
   ``training.objective: sft`` (configs/cloud_demo_sft.yaml);
2. **the model writes its own critiques**: the SFT model is exported as an HF
   causal LM (``ckpt_convert/mcore2hf.py``) and ``python -m megarm.generate`` writes a
   critique of every training response (greedy);
3. **joint training**: ``--handler-name critique_pairs`` on the generated file, and
   ``training.objective: joint`` (0.7 x Bradley-Terry + 0.3 x LM loss on the
   critiques, configs/cloud_demo_joint.yaml) from the SFT checkpoint; exported as a
   causal LM and a sequence classifier sharing the trunk.

Held-out pairs are then scored as a CLoud model is used: ``megarm.score
--critique-model`` writes each critique with the exported causal LM and reads the
reward at its end. The demo prints the critique exact-match rate (against the
defect sentence) and the pairwise accuracy, and fails below ``--min-exact-match`` /
``--min-accuracy``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from megarm.data.templates import DEFAULT_CRITIQUE_PROMPT, critique_request
from megarm.demo_common import (
    ADJECTIVES,
    NOUNS,
    PLACES,
    PREPOSITIONS,
    ROOT,
    VERBS,
    build_hf_model,
    finish_work_dir,
    fresh_work_dir,
    master_port,
    run,
    step,
)

CRITIQUES = {
    "correct": "It is correct.",
    "period": "It lacks a period.",
    "repeat": "It repeats a word.",
    "upper": "It is all capitals.",
    "short": "It stops too early.",
}


def make_critique_pair(rng: random.Random) -> dict[str, str]:
    """A pair and its critiques: the chosen sentence is correct, the rejected one has
    one of three defects, and each critique is the sentence naming it."""
    noun = rng.choice(NOUNS)
    words = ["the", rng.choice(ADJECTIVES), noun, rng.choice(VERBS), rng.choice(PREPOSITIONS),
             "the", rng.choice(PLACES)]
    defect = rng.choice(["period", "repeat", "upper", "short"])
    bad = words[:]
    if defect == "repeat":
        at = rng.randrange(1, len(words))
        bad.insert(at, words[at])
    elif defect == "upper":
        bad = [w.upper() for w in words]
    else:
        bad = words[:4]
    return {
        "prompt": f"Write a short sentence about a {noun}.",
        "chosen": " ".join(words) + ".",
        "rejected": " ".join(bad) + ("" if defect == "period" else "."),
        "chosen_critique": CRITIQUES["correct"],
        "rejected_critique": CRITIQUES[defect],
    }


def write_critique_pairs(path: Path, count: int, seed: int) -> list[dict[str, str]]:
    """``count`` pairs with their reference critiques as JSON lines."""
    rng = random.Random(seed)
    rows = [make_critique_pair(rng) for _ in range(count)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


def write_sft_records(rows: list[dict[str, str]], path: Path) -> None:
    """Stage 1's SFT records: for each response, the conversation up to the critique
    turn (the same wording stage 3 and scoring use) and the critique as the target."""
    with open(path, "w") as fh:
        for row in rows:
            for side in ("chosen", "rejected"):
                prompt = [{"role": "user", "content": row["prompt"]}]
                messages = [
                    *prompt,
                    {"role": "assistant", "content": row[side]},
                    {"role": "user", "content": critique_request(
                        DEFAULT_CRITIQUE_PROMPT, prompt, row[side])},
                    {"role": "assistant", "content": row[f"{side}_critique"]},
                ]
                fh.write(json.dumps({"messages": messages}) + "\n")


def train(py: str, nproc: int, config: str, work: Path, load: Path, data: str, save: str,
          logs: str, extra: list[str]) -> None:
    """``megarm.train`` under torchrun from ``load`` (weights only) into ``save``."""
    run([py, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
         "--master_port", master_port(), "-m", "megarm.train",
         "--config", config, f"model.hf_config={work / 'mcore_base'}",
         f"checkpoint.load={load}", f"data.data_path={work / 'data' / data}",
         f"data.tokenizer_name_or_path={work / 'tokenizer'}",
         f"checkpoint.save={work / save}", f"logging.log_dir={work / logs}", *extra])


def main(argv: list[str] | None = None) -> int:
    """Run the three stages and the held-out scoring; non-zero below the targets."""
    parser = argparse.ArgumentParser(prog="python -m megarm.demo --recipe cloud",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=ROOT / "work" / "demo_cloud")
    parser.add_argument("--train-pairs", type=int, default=1000)
    parser.add_argument("--heldout-pairs", type=int, default=200)
    parser.add_argument("--nproc", type=int, default=2, help="ranks (the configs use TP=2)")
    parser.add_argument("--min-exact-match", type=float, default=0.9)
    parser.add_argument("--min-accuracy", type=float, default=0.9)
    args = parser.parse_args(argv)
    work = args.work_dir.resolve()
    fresh_work_dir(work)
    data = work / "data"
    data.mkdir(parents=True)
    started = time.time()
    py = sys.executable
    prep = [py, "tools/preprocess_data.py", "--tokenizer-name-or-path", work / "tokenizer",
            "--seq-length", "128", "--log-interval", "100000"]

    with step("1/9 tokenizer, a tiny random-init Qwen2ForCausalLM, converted with its LM head"):
        from megarm.data.tokenizer import build_qwen25_tokenizer

        build_qwen25_tokenizer(work / "tokenizer")
        build_hf_model(work / "hf_base", work / "tokenizer", seed=0)
        run([py, "ckpt_convert/hf2mcore.py", "--load-dir", work / "hf_base", "--save-dir",
             work / "mcore_base", "--params-dtype", "fp32", "--keep-lm-head"])
    with step("2/9 synthetic pairs whose critiques name the defect of the response"):
        rows = write_critique_pairs(data / "train.jsonl", args.train_pairs, seed=1)
        heldout = write_critique_pairs(data / "heldout.jsonl", args.heldout_pairs, seed=2)
        write_sft_records(rows, data / "sft.jsonl")
        print(f"    example: {json.dumps(heldout[0])}")
    with step("3/9 stage 1 data: SFT records (only the critique supervised)"):
        run([*prep, "--input", data / "sft.jsonl", "--output-prefix", data / "sft",
             "--handler-name", "sft"])
    with step(f"4/9 stage 1: SFT on the critiques ({args.nproc} ranks)"):
        train(py, args.nproc, "configs/cloud_demo_sft.yaml", work, work / "mcore_base", "sft",
              "ckpt_sft", "logs_sft", [])
    with step("5/9 export the SFT model as an HF causal LM"):
        run([py, "ckpt_convert/mcore2hf.py", "--load-dir", work / "ckpt_sft", "--save-dir",
             work / "hf_sft", "--tokenizer-model", work / "tokenizer"])
    with step("6/9 stage 2: the SFT model writes the critiques of the training pairs"):
        run([py, "-m", "megarm.generate", "--model", work / "hf_sft" / "causal_lm", "--input",
             data / "train.jsonl", "--output", data / "generated.jsonl", "--batch-size", "64",
             "--max-new-tokens", "16"])
        generated = [json.loads(line) for line in (data / "generated.jsonl").open()]
        agree = sum(g[f"{s}_critique"] == r[f"{s}_critique"] for g, r in zip(generated, rows)
                    for s in ("chosen", "rejected")) / (2 * len(rows))
        print(f"    generated critiques equal to the reference: {agree:.3f}")
    with step("7/9 stage 3 data: critique pairs (prompt + response + own critique)"):
        run([*prep, "--input", data / "generated.jsonl", "--output-prefix", data / "critique",
             "--handler-name", "critique_pairs"])
    with step(f"8/9 stage 3: joint 0.7 x BT + 0.3 x LM from the SFT model ({args.nproc} ranks)"):
        train(py, args.nproc, "configs/cloud_demo_joint.yaml", work, work / "ckpt_sft",
              "critique", "ckpt_joint", "logs_joint", [])
        run([py, "ckpt_convert/mcore2hf.py", "--load-dir", work / "ckpt_joint", "--save-dir",
             work / "hf_cloud", "--tokenizer-model", work / "tokenizer"])
    with step("9/9 held-out: write each critique, then read the reward at its end"):
        run([py, "-m", "megarm.score", "--load", work / "hf_cloud" / "reward",
             "--critique-model", work / "hf_cloud" / "causal_lm", "--critique-max-new-tokens",
             "16", "--input", data / "heldout.jsonl", "--output", work / "heldout_scored.jsonl"])
        scored = [json.loads(line) for line in (work / "heldout_scored.jsonl").open()]
    exact = sum(s[f"{side}_critique"] == h[f"{side}_critique"] for s, h in zip(scored, heldout)
                for side in ("chosen", "rejected")) / (2 * len(heldout))
    accuracy = sum(s["chosen_reward"] > s["rejected_reward"] for s in scored) / len(scored)
    print(f"\nheld-out critique exact-match ({2 * len(heldout)} critiques): {exact:.3f}")
    print(f"held-out pairwise accuracy ({len(heldout)} pairs, reward after the model's own "
          f"critique): {accuracy:.3f}")
    finish_work_dir()
    print(f"total time {time.time() - started:.0f}s. Outputs in {work}: hf_sft/causal_lm, "
          "hf_cloud/{causal_lm,reward}, data/generated.jsonl, heldout_scored.jsonl, logs_*")
    failed = False
    if exact < args.min_exact_match:
        print(f"FAILED: exact-match {exact:.3f} < {args.min_exact_match}", file=sys.stderr)
        failed = True
    if accuracy < args.min_accuracy:
        print(f"FAILED: accuracy {accuracy:.3f} < {args.min_accuracy}", file=sys.stderr)
        failed = True
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
