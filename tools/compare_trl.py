"""Training speed of megarm against TRL's RewardTrainer on the same model and data.

    python tools/compare_trl.py --trl-python /path/to/venv-with-trl/bin/python \
        [--pairs 512] [--steps 25] [--warmup 5] [--repeats 3] [--layouts thd] \
        [--baseline-root /path/to/an/older/megarm/checkout] [--work-dir work/compare_trl]

TRL is not a megarm dependency: install it in a separate virtualenv and pass its
python. Both sides train the same tiny Qwen2-shaped reward model (same initial
weights: a random ``Qwen2ForSequenceClassification`` converted with
ckpt_convert/hf2mcore.py) in fp32 on CPU, on the same HH-RLHF pairs tokenized
once by tools/preprocess_data.py with the offline Qwen2.5 tokenizer (TRL gets
the very same token ids as ``chosen_ids``/``rejected_ids``), 8 pairs per step,
one process each.

Each side is timed from inside its own run, per step, after ``--warmup`` steps
(TRL: a callback around each optimizer step; megarm: the loop's own iteration
time): start-up, data loading and the model build never count, and the median
step is robust to a neighbour's burst on a shared machine. The runs alternate
(TRL, megarm [, the baseline checkout], ``--repeats`` times) so load drifts hit
both sides alike; one JSON line per run, then a summary line with the medians over
the repeats, megarm's ratio to TRL in real tokens/s (of the medians, and the median
of each round's ratio), and a CPU MFU: model FLOPs per step
(megarm/training/flops.py) over the median step time, against this machine's fp32
GEMM rate at the step's GEMM shapes, measured right after each megarm run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The project's shared/ folder sits beside the checkout.
HH = ROOT.parent / "shared" / "data" / "hh_rlhf_harmless_1800.jsonl.gz"

TRL_RUNNER = r'''
import json, sys, time
import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
from trl import RewardConfig, RewardTrainer

model_dir, data_file, steps, warmup, batch, out = sys.argv[1:7]
steps, warmup, batch = int(steps), int(warmup), int(batch)
rows = [json.loads(x) for x in open(data_file)]
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForSequenceClassification.from_pretrained(model_dir, torch_dtype=torch.float32)

class Timer(TrainerCallback):
    def __init__(self):
        self.times = []
    def on_step_begin(self, args, state, control, **kw):
        self.t = time.perf_counter()
    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self.t)

timer = Timer()
args = RewardConfig(output_dir=out, per_device_train_batch_size=batch, max_steps=steps,
                    learning_rate=1e-4, logging_steps=10_000, save_strategy="no", report_to=[],
                    bf16=False, fp16=False, use_cpu=True, dataloader_num_workers=0,
                    max_length=None, gradient_accumulation_steps=1, seed=1234,
                    disable_tqdm=True)
trainer = RewardTrainer(model=model, args=args, processing_class=tok,
                        train_dataset=Dataset.from_list(rows), callbacks=[timer])
trainer.train()
# The sampler shuffles: count tokens of the batches actually drawn per step is not
# exposed, so use the dataset mean per pair (both sides see the same pairs).
pair_tokens = sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows) / len(rows)
timed = timer.times[warmup:]
median = sorted(timed)[len(timed) // 2]
print(json.dumps({"framework": "trl", "steps_timed": len(timed),
                  "tokens_per_s": pair_tokens * batch / median,
                  "pairs_per_s": batch / median,
                  "step_time_s": median}))
'''


def sh(cmd: list, root: Path = ROOT, **kw) -> subprocess.CompletedProcess:
    """Run a command from ``root`` (a megarm checkout), failing loudly."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
               PYTHONPATH=str(root))
    done = subprocess.run([str(c) for c in cmd], cwd=root, env=env, text=True,
                          capture_output=True, **kw)
    if done.returncode:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        done.check_returncode()
    return done


def gemm_rate(tokens: int, hidden: int, ffn: int, qkv: int, repeats: int = 20) -> float:
    """This machine's fp32 GEMM rate (FLOP/s) at a step's GEMM shapes, forward and
    the two backward products of each linear layer, median of ``repeats``."""
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    shapes = [(tokens, hidden, qkv), (tokens, hidden, hidden), (tokens, hidden, 2 * ffn),
              (tokens, ffn, hidden)]
    flops = seconds = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        g = torch.randn(m, n)
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            g @ b.t()
            a.t() @ g
            samples.append(time.perf_counter() - start)
        flops += 3 * 2 * m * k * n
        seconds += statistics.median(samples)
    return flops / seconds


def main(argv: list[str] | None = None) -> int:
    """Prepare shared inputs, run both frameworks, print one JSON line each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trl-python", required=True, help="python of a venv with trl installed")
    parser.add_argument("--input", type=Path, default=HH, help="HH-RLHF jsonl(.gz) pairs")
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per side")
    parser.add_argument("--layouts", nargs="+", default=["thd"],
                        choices=["padded", "rows", "thd"], help="megarm data layouts to run")
    parser.add_argument("--baseline-root", type=Path,
                        help="another megarm checkout (e.g. before a change) run alongside")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "work" / "compare_trl")
    args = parser.parse_args(argv)
    work = args.work_dir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    py = sys.executable

    import gzip

    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoConfig, AutoTokenizer, Qwen2ForSequenceClassification

    from megarm.config import ModelConfig
    from megarm.data.tokenizer import build_qwen25_tokenizer
    from megarm.families.qwen2 import QWEN2

    build_qwen25_tokenizer(work / "tokenizer")
    tok = AutoTokenizer.from_pretrained(work / "tokenizer")
    torch.manual_seed(0)
    ffn = args.hidden * 11 // 4 // 8 * 8
    shape = ModelConfig(vocab_size=151936, hidden_size=args.hidden, ffn_hidden_size=ffn,
                        num_layers=args.layers, num_attention_heads=4, num_query_groups=2,
                        max_position_embeddings=4096, rotary_base=1e6, tie_word_embeddings=True)
    keys = QWEN2.write(shape)  # the HF config keys, through the qwen2 family's table
    config = AutoConfig.for_model(keys.pop("model_type"), **keys, num_labels=1,
                                  pad_token_id=tok.pad_token_id)
    Qwen2ForSequenceClassification(config).save_pretrained(work / "hf")
    tok.save_pretrained(work / "hf")
    with gzip.open(args.input, "rt") as src, open(work / "pairs.jsonl", "w") as dst:
        for i, line in enumerate(src):
            if i == args.pairs:
                break
            dst.write(line)
    sh([py, "tools/preprocess_data.py", "--input", work / "pairs.jsonl", "--output-prefix",
        work / "hh", "--tokenizer-name-or-path", work / "tokenizer", "--handler-name", "hh_rlhf",
        "--seq-length", "1024", "--workers", "1"])
    sh([py, "ckpt_convert/hf2mcore.py", "--load-dir", work / "hf", "--save-dir", work / "mcore",
        "--params-dtype", "fp32"])
    chosen = IndexedDataset(str(work / "hh_packed_chosen_input_ids_document"))
    rejected = IndexedDataset(str(work / "hh_packed_rejected_input_ids_document"))
    with open(work / "trl.jsonl", "w") as fh:
        for c, r in zip(chosen, rejected, strict=True):
            fh.write(json.dumps({"chosen_ids": c.tolist(), "rejected_ids": r.tolist()}) + "\n")
    kept = len(chosen)
    print(json.dumps({"pairs_kept": kept, "model": {"hidden": args.hidden,
                      "layers": args.layers, "ffn": ffn}}), flush=True)

    (work / "trl_runner.py").write_text(TRL_RUNNER)
    sides = [(f"megarm packing={p}" + (f" ({f})" if p == "true" else ""), p, f, ROOT)
             for p, f in (("false", "auto"), ("true", "rows"), ("true", "thd"))
             if (f if p == "true" else "padded") in args.layouts]
    if args.baseline_root:
        sides += [(label.replace("megarm", "megarm baseline"), p, f, args.baseline_root.resolve())
                  for label, p, f, _ in list(sides)]
    runs: dict[str, list[dict]] = {}
    for _ in range(args.repeats):  # alternate: load drifts hit every side alike
        done = sh([args.trl_python, work / "trl_runner.py", work / "hf", work / "trl.jsonl",
                   args.steps, args.warmup, args.batch, work / "trl_out"])
        line = json.loads(done.stdout.strip().splitlines()[-1])
        runs.setdefault("trl", []).append(line)
        print(json.dumps(line), flush=True)
        for label, packing, layout, root in sides:
            done = sh([py, "-m", "torch.distributed.run", "--nproc_per_node", "1",
                       "tools/benchmark_train.py", "--warmup", str(args.warmup),
                       "--label", label, f"data.packed_format={layout}",
                       f"model.hf_config={work / 'mcore'}", f"checkpoint.load={work / 'mcore'}",
                       "checkpoint.finetune=true", f"data.data_path={work / 'hh'}",
                       "data.split=100,0,0", "data.seq_length=1024", f"data.packing={packing}",
                       "model.params_dtype=fp32", f"training.micro_batch_size={args.batch}",
                       f"training.global_batch_size={args.batch}",
                       f"training.train_iters={args.steps}", "optimizer.lr=1e-4"], root=root)
            line = json.loads(next(x for x in done.stdout.splitlines() if x.startswith("{")))
            # the GEMM rate right after the run: the machine's speed drifts with its load
            line["gemm_flops_per_s"] = gemm_rate(
                tokens=int(line["stream_tokens"]), hidden=args.hidden, ffn=ffn,
                qkv=args.hidden + 2 * 2 * (args.hidden // 4))
            line["mfu_cpu"] = (line["model_flops_per_iteration"] / line["iteration_time_median_s"]
                               / line["gemm_flops_per_s"])
            line["vs_trl_this_round"] = line["tokens_per_s"] * line["iteration_time_s"] / (
                line["iteration_time_median_s"] * runs["trl"][-1]["tokens_per_s"])
            runs.setdefault(label, []).append(line)
            print(json.dumps(line), flush=True)
    trl_tps = statistics.median(r["tokens_per_s"] for r in runs["trl"])
    summary: dict[str, object] = {
        "trl_tokens_per_s": trl_tps,
        "trl_step_s": statistics.median(r["step_time_s"] for r in runs["trl"])}
    for label, *_ in sides:
        mine = runs[label]
        # real tokens of a median step: the run's token rate at its mean step time
        tps = statistics.median(r["tokens_per_s"] * r["iteration_time_s"]
                                / r["iteration_time_median_s"] for r in mine)
        summary[label] = {
            "step_s": statistics.median(r["iteration_time_median_s"] for r in mine),
            "tokens_per_s": tps, "vs_trl": tps / trl_tps,
            "vs_trl_paired_median": statistics.median(r["vs_trl_this_round"] for r in mine),
            "gemm_gflops": statistics.median(r["gemm_flops_per_s"] for r in mine) / 1e9,
            "mfu_cpu": statistics.median(r["mfu_cpu"] for r in mine)}
    print(json.dumps({"summary": summary}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
