"""Training speed of megarm against TRL's RewardTrainer on the same model and data.

    python tools/compare_trl.py --trl-python /path/to/venv-with-trl/bin/python \
        [--pairs 512] [--steps 30] [--warmup 5] [--work-dir work/compare_trl]

TRL is not a megarm dependency: install it in a separate virtualenv and pass its
python. Both sides train the same tiny Qwen2-shaped reward model (same initial
weights: a random ``Qwen2ForSequenceClassification`` converted with
ckpt_convert/hf2mcore.py) in fp32 on CPU, on the same HH-RLHF pairs tokenized
once by tools/preprocess_data.py with the offline Qwen2.5 tokenizer (TRL gets
the very same token ids as ``chosen_ids``/``rejected_ids``), 8 pairs per step,
one process each. Reported: real (non-pad) tokens/s and pairs/s over the timed
steps, as one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
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
seconds = sum(timed)
print(json.dumps({"framework": "trl", "steps_timed": len(timed),
                  "tokens_per_s": pair_tokens * batch * len(timed) / seconds,
                  "pairs_per_s": batch * len(timed) / seconds,
                  "step_time_s": seconds / len(timed)}))
'''


def sh(cmd: list, **kw) -> subprocess.CompletedProcess:
    """Run a command from the repository root, failing loudly."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    return subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, check=True, text=True,
                          capture_output=True, **kw)


def main(argv: list[str] | None = None) -> int:
    """Prepare shared inputs, run both frameworks, print one JSON line each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trl-python", required=True, help="python of a venv with trl installed")
    parser.add_argument("--input", type=Path, default=HH, help="HH-RLHF jsonl(.gz) pairs")
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
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
    done = sh([args.trl_python, work / "trl_runner.py", work / "hf", work / "trl.jsonl",
               args.steps, args.warmup, args.batch, work / "trl_out"])
    print(done.stdout.strip().splitlines()[-1], flush=True)

    for packing, layout in (("false", "auto"), ("true", "rows"), ("true", "thd")):
        label = f"megarm packing={packing}" + (f" ({layout})" if packing == "true" else "")
        done = sh([py, "-m", "torch.distributed.run", "--nproc_per_node", "1",
                   "tools/benchmark_train.py", "--warmup", str(args.warmup),
                   "--label", label, f"data.packed_format={layout}",
                   f"model.hf_config={work / 'mcore'}", f"checkpoint.load={work / 'mcore'}",
                   "checkpoint.finetune=true", f"data.data_path={work / 'hh'}",
                   "data.split=100,0,0", "data.seq_length=1024", f"data.packing={packing}",
                   "model.params_dtype=fp32", f"training.micro_batch_size={args.batch}",
                   f"training.global_batch_size={args.batch}", f"training.train_iters={args.steps}",
                   "optimizer.lr=1e-4"])
        line = next(x for x in done.stdout.splitlines() if x.startswith("{"))
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
