"""Rewards of one HF export through two transformers versions (issue 24, section 3).

    python tools/benchmark_hf_versions.py --model HF_DIR --pairs heldout.jsonl \\
        --other-python /tmp/tf451/bin/python [--limit 400]

RewardBench 0.1.4 pins transformers 4.51; OpenRLHF and verl releases and older vLLM
run 4.x too. This scores the export's held-out pairs (``apply_chat_template`` text,
tokenised once here, so only the model differs) with ``AutoModelForSequenceClassification``
in this interpreter's transformers and in ``--other-python``'s (a separate venv:
``python -m venv /tmp/tf451 && /tmp/tf451/bin/pip install torch transformers==4.51.3``),
and prints the largest reward difference, both accuracies and the mean chosen reward.
``--strip-legacy`` also scores a copy whose config.json lacks the keys only 4.x reads
(what transformers 5's ``save_pretrained`` alone writes): the bug this guards against.
It checks too that the other version's ``apply_chat_template`` gives the same ids.
Exit status 1 when the rewards differ by more than ``--atol`` (1e-5).

The worker mode (``--worker``) imports only torch and transformers, so it runs in
any venv.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# megarm.families is plain Python (no torch, no megatron): the worker imports it in any venv.
sys.path.insert(0, str(ROOT))

from megarm.families import detect  # noqa: E402
from megarm.families.base import LEGACY_KEYS  # noqa: E402


def rope_base(config: dict[str, Any]) -> float | None:
    """The RoPE base a transformers config (``to_dict()``) holds, read as megarm reads
    config.json: the top-level key (4.x; its default when the file lacked it), else
    transformers 5's ``rope_parameters``."""
    (key,) = [k for k in detect(config).config if k.field == "rotary_base"]
    return key.lookup(config)[1]


def chat(prompt: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def template_ids(model: str, rows: list[dict[str, Any]]) -> list[list[int]]:
    """``apply_chat_template``'s ids of every chosen and rejected text, in order."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    out = []
    for row in rows:
        for side in ("chosen", "rejected"):
            ids = tok.apply_chat_template(chat(row["prompt"], row[side]), tokenize=True)
            out.append(list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids))
    return out


def worker(model_dir: str, ids_file: str, out_file: str) -> None:
    """Rewards of the sequences in ``ids_file`` (right-padded batches of 32, fp32)."""
    import torch
    import transformers
    from transformers import AutoModelForSequenceClassification

    seqs = json.loads(Path(ids_file).read_text())
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, torch_dtype=torch.float32)
    model.eval()
    pad = model.config.pad_token_id
    rewards: list[float] = []
    with torch.no_grad():
        for i in range(0, len(seqs), 32):
            batch = seqs[i : i + 32]
            width = max(map(len, batch))
            ids = torch.full((len(batch), width), pad)
            mask = torch.zeros_like(ids)
            for j, seq in enumerate(batch):
                ids[j, : len(seq)] = torch.tensor(seq)
                mask[j, : len(seq)] = 1
            rewards += model(input_ids=ids, attention_mask=mask).logits[:, 0].tolist()
    theta = rope_base(model.config.to_dict())
    Path(out_file).write_text(json.dumps({
        "transformers": transformers.__version__, "rewards": rewards, "rope_base": theta,
    }))


def score(python: str, model: Path, ids_file: Path, work: Path, name: str) -> dict[str, Any]:
    out = work / f"{name}.json"
    done = subprocess.run(
        [python, __file__, "--worker", "--model", str(model), "--ids", str(ids_file), "--out", str(out)],
        capture_output=True, text=True, timeout=1800, cwd=ROOT,
    )
    if done.returncode != 0:
        raise SystemExit(f"{python} failed:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def summary(found: dict[str, Any]) -> str:
    rewards = found["rewards"]
    chosen, rejected = rewards[0::2], rewards[1::2]
    accuracy = sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(chosen)
    mean = sum(chosen) / len(chosen)
    std = (sum((c - mean) ** 2 for c in chosen) / len(chosen)) ** 0.5
    return (f"transformers {found['transformers']}: RoPE base read {found['rope_base']}, "
            f"accuracy {accuracy:.4f}, mean chosen reward {mean:.4f} (std {std:.4f})")


def compare(args: argparse.Namespace, rows: list[dict[str, Any]], work: Path) -> int:
    ids = template_ids(str(args.model), rows)
    ids_file = work / "ids.json"
    ids_file.write_text(json.dumps(ids))
    # The other version's template: the same ids, or the comparison says so.
    probe = subprocess.run(
        [args.other_python, "-c", "import sys, json; sys.path.insert(0, sys.argv[1]);"
         "import benchmark_hf_versions as b; rows = json.load(open(sys.argv[3]));"
         "print(json.dumps(b.template_ids(sys.argv[2], rows)))",
         str(Path(__file__).parent), str(args.model), str(work / "rows.json")],
        capture_output=True, text=True, timeout=600,
    )
    same_ids = probe.returncode == 0 and json.loads(probe.stdout) == ids
    print(f"{len(rows)} pairs; the other version's apply_chat_template gives the same ids: "
          f"{same_ids}" + ("" if probe.returncode == 0 else f" (it failed: {probe.stderr[-300:]})"))
    here = score(sys.executable, args.model, ids_file, work, "here")
    other = score(args.other_python, args.model, ids_file, work, "other")
    diff = max(abs(a - b) for a, b in zip(here["rewards"], other["rewards"], strict=True))
    print(summary(here))
    print(summary(other))
    print(f"largest |reward difference|: {diff:.3g} (tolerance {args.atol:g})")
    if args.strip_legacy:
        stripped = work / "stripped"
        shutil.copytree(args.model, stripped)
        config = json.loads((stripped / "config.json").read_text())
        for key in LEGACY_KEYS:
            config.pop(key, None)
        (stripped / "config.json").write_text(json.dumps(config, indent=2))
        old = score(args.other_python, stripped, ids_file, work, "stripped")
        old_diff = max(abs(a - b) for a, b in zip(here["rewards"], old["rewards"], strict=True))
        print("without the legacy keys (transformers 5's config.json alone): " + summary(old))
        print(f"  largest |reward difference| from {here['transformers']}: {old_diff:.3g}")
    return 0 if diff <= args.atol else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="HF reward model directory (an export)")
    p.add_argument("--pairs", type=Path, help="jsonl of {prompt, chosen, rejected}")
    p.add_argument("--other-python", help="the interpreter of the venv with the other transformers")
    p.add_argument("--limit", type=int, default=400, help="pairs to score (400)")
    p.add_argument("--atol", type=float, default=1e-5, help="largest reward difference allowed")
    p.add_argument("--strip-legacy", action="store_true",
                   help="also score a copy without the transformers 4.x keys (shows the bug)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ids", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(str(args.model), args.ids, args.out)
        return 0
    if args.pairs is None or args.other_python is None:
        p.error("--pairs and --other-python are required")
    rows = [json.loads(line) for line in args.pairs.read_text().splitlines() if line.strip()]
    rows = rows[: args.limit]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "rows.json").write_text(json.dumps(rows))
        return compare(args, rows, work)


if __name__ == "__main__":
    sys.exit(main())
