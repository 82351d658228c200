"""What both demos share (:mod:`megarm.demo`, :mod:`megarm.demo_cloud`): the word
lists of the synthetic preference pairs, the pair writer, the work directory, the step
printer, the command runner and the tiny random-init Qwen2 checkpoint."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
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


# In a demo's work directory: "incomplete ..." while it runs or after a failed step,
# "complete" once every step ran. Only a directory holding it (or an empty one) is
# ever removed by a new run.
MARKER = ".megarm_demo"
_work: Path | None = None


class DemoError(SystemExit):
    """A demo stopped: one ``error:`` line on stderr and exit status 2."""

    def __init__(self, message: str) -> None:
        print(f"error: {message}", file=sys.stderr, flush=True)
        super().__init__(2)


def fresh_work_dir(work: Path) -> None:
    """Start ``work`` anew for a demo run. An earlier demo's directory (it holds
    :data:`MARKER`) or an empty one is replaced; any other existing path is refused
    untouched (a ``--work-dir`` that names a real directory must not be wiped)."""
    global _work
    if work.exists():
        if not work.is_dir() or (any(work.iterdir()) and not (work / MARKER).is_file()):
            raise DemoError(f"--work-dir {work} exists and was not made by a megarm demo (no "
                            f"{MARKER} in it): choose a new or empty directory; nothing was removed")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / MARKER).write_text("incomplete: running\n")
    _work = work


def finish_work_dir() -> None:
    """Mark the work directory complete: every step ran."""
    if _work is not None:
        (_work / MARKER).write_text("complete\n")


@contextmanager
def step(title: str):
    """Print what a step does and how long it took. A failing command stops the demo
    with one line naming the step, and the work directory says it is incomplete."""
    print(f"\n==> {title}", flush=True)
    if _work is not None:
        (_work / MARKER).write_text(f"incomplete: running step {title}\n")
    start = time.time()
    try:
        yield
    except subprocess.CalledProcessError as exc:
        if _work is not None:
            (_work / MARKER).write_text(f"incomplete: step {title} failed (exit {exc.returncode})\n")
        where = f"; {_work} is incomplete (a new run replaces it)" if _work is not None else ""
        raise DemoError(f"step {title} failed: {' '.join(str(c) for c in exc.cmd)} exited "
                        f"{exc.returncode} (its output is above){where}") from None
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


def master_port() -> str:
    """``MASTER_PORT`` when set, else a port free now: a fixed default made two demos
    on one machine collide with a torch traceback (issue #25)."""
    if os.environ.get("MASTER_PORT"):
        return os.environ["MASTER_PORT"]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])
