"""Load figures for ``megarm.serve``: requests/s, sequences/s and p50/p99 latency.

    python tools/benchmark_serve.py --load EXPORT_OR_CKPT --pairs heldout.jsonl \\
        [--clients 1 8 32] [--per-request 1 16] [--seconds 20] [--server-arg ...]

Starts the server on a free loopback port, checks that its rewards equal
``megarm.score``'s on the same texts (to 1e-5), then for each number of concurrent
clients and sequences per request runs closed-loop clients (each sends its next
request when the last one is answered) for ``--seconds`` and prints a markdown table.
Queries are OpenRLHF's form: chat text ending at ``<|im_end|>``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def queries(tokenizer_dir: str, pairs: Path) -> tuple[list[str], list[dict]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    texts, singles = [], []
    for row in rows:
        for side in ("chosen", "rejected"):
            messages = [{"role": "user", "content": row["prompt"]},
                        {"role": "assistant", "content": row[side]}]  # fmt: skip
            texts.append(tok.apply_chat_template(messages, tokenize=False).removesuffix("\n"))
            singles.append({"prompt": row["prompt"], "response": row[side]})
    return texts, singles


def start(load: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:  # a free loopback port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "megarm.serve", "--load", load, "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    raise SystemExit("the server did not start")


def check_equal(url: str, load: str, texts: list[str], singles: list[dict]) -> float:
    """Largest |server - megarm.score| over every text."""
    with tempfile.TemporaryDirectory() as tmp:
        data, out = Path(tmp) / "in.jsonl", Path(tmp) / "out.jsonl"
        data.write_text("".join(json.dumps(s) + "\n" for s in singles))
        subprocess.run([sys.executable, "-m", "megarm.score", "--load", load, "--input",
                        str(data), "--output", str(out)], cwd=ROOT, check=True,
                       capture_output=True)  # fmt: skip
        want = [json.loads(line)["reward"] for line in out.read_text().splitlines()]
    got = []
    for i in range(0, len(texts), 64):
        reply = httpx.post(url + "/get_reward", json={"query": texts[i : i + 64]}, timeout=300)
        got += reply.json()["rewards"]
    return float(np.max(np.abs(np.array(got) - np.array(want))))


def load_run(url: str, texts: list[str], clients: int, per_request: int, seconds: float) -> dict:
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client(k: int) -> None:
        at = k * 7919
        with httpx.Client(timeout=300) as http:
            while time.perf_counter() < stop:
                batch = [texts[(at + j) % len(texts)] for j in range(per_request)]
                at += per_request
                t0 = time.perf_counter()
                reply = http.post(url + "/get_reward", json={"query": batch})
                reply.raise_for_status()
                with lock:
                    latencies.append(time.perf_counter() - t0)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    lat = np.array(latencies) * 1000
    return {
        "clients": clients,
        "per_request": per_request,
        "requests": len(latencies),
        "req_s": len(latencies) / elapsed,
        "seq_s": len(latencies) * per_request / elapsed,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--load", required=True)
    p.add_argument("--pairs", required=True, type=Path, help="held-out pairs (prompt/chosen/rejected)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--per-request", type=int, nargs="+", default=[1, 16])
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--server-arg", action="append", default=[], help="extra megarm.serve option")
    args = p.parse_args()
    texts, singles = queries(args.load, args.pairs)
    proc, url = start(args.load, args.server_arg)
    try:
        diff = check_equal(url, args.load, texts, singles)
        print(f"max |server - megarm.score| over {len(texts)} texts: {diff:.2e}", flush=True)
        print("| clients | sequences/request | requests | req/s | seq/s | p50 ms | p99 ms |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for per_request in args.per_request:
            for clients in args.clients:
                r = load_run(url, texts, clients, per_request, args.seconds)
                print(f"| {clients} | {per_request} | {r['requests']} | {r['req_s']:.1f} | "
                      f"{r['seq_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |", flush=True)  # fmt: skip
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
