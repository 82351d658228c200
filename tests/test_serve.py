"""megarm.serve as clients use it: a real server process on a loopback port, real HTTP.

The server's rewards must equal megarm.score's on the same texts (fp32, 1e-5); every
bad request gets its documented status and a one-line reason; a client that goes away
does not hold up others; SIGTERM lets the request in flight finish."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest

from megarm.testing import free_port

REPO = Path(__file__).resolve().parents[1]
KEY = "s3cret"
PROMPT = "Write a short sentence about a cat."
ANSWERS = ["the big cat sleeps under the table.", "table the cat under big sleeps the.",
           "the small cat waits near the door."]  # fmt: skip


@contextmanager
def server(*args: str, launcher: list[str] | None = None, timeout: float = 180.0):
    """A running ``megarm.serve`` (``launcher``: e.g. torchrun); yields (url, process)."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [*(launcher or [sys.executable]), "-m", "megarm.serve", "--port", str(port), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited {proc.returncode}:\n{proc.stdout.read()}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "server did not come up"
            time.sleep(0.3)
        # torchrun starts its workers in sessions of their own: remember them.
        children = psutil.Process(proc.pid).children(recursive=True)
        yield url, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        _, alive = psutil.wait_procs(locals().get("children", []), timeout=30)
        for child in alive:
            child.kill()
        assert not alive, f"{len(alive)} server process(es) outlived the launcher"


def queries(tokenizer_dir: Path) -> tuple[list[str], list[str], list[list[dict]]]:
    """OpenRLHF-style queries (chat text ending at <|im_end|>, as vLLM stops there),
    their prompts, and the same conversations as messages."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    convs = [[{"role": "user", "content": PROMPT}, {"role": "assistant", "content": a}]
             for a in ANSWERS]  # fmt: skip
    texts = [tok.apply_chat_template(c, tokenize=False).removesuffix("\n") for c in convs]
    prompt = tok.apply_chat_template(convs[0][:1], tokenize=False, add_generation_prompt=True)
    return texts, [prompt] * len(texts), convs


@pytest.fixture(scope="module")
def reference(rm_export, tmp_path_factory) -> list[float]:
    """megarm.score's rewards for the same conversations."""
    from megarm.score import main

    tmp = tmp_path_factory.mktemp("serve_ref")
    data = tmp / "in.jsonl"
    data.write_text("".join(json.dumps({"prompt": PROMPT, "response": a}) + "\n" for a in ANSWERS))
    assert main(["--load", str(rm_export), "--input", str(data), "--output", str(tmp / "o")]) == 0
    return [json.loads(line)["reward"] for line in (tmp / "o").read_text().splitlines()]


@pytest.fixture(scope="module")
def live(rm_export):
    limits = ["--max-sequences", "8", "--max-body-bytes", "20000", "--seq-length", "128"]
    with server("--load", str(rm_export), "--api-key", KEY, *limits) as (url, proc):
        yield url


def post(url: str, path: str, body, key: str | None = KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (bytes, str)):
        return httpx.post(url + path, content=body, headers=headers, timeout=60, **kwargs)
    return httpx.post(url + path, json=body, headers=headers, timeout=60, **kwargs)


def test_openrlhf_request_gets_megarm_score_rewards(live, rm_export, reference):
    texts, prompts, convs = queries(rm_export)
    body = {"query": texts, "prompts": prompts, "labels": [None] * len(texts)}
    got = post(live, "/get_reward", body)
    assert got.status_code == 200, got.text
    data = got.json()
    assert set(data) == {"rewards", "scores", "extra_logs"}
    assert data["rewards"] == pytest.approx(reference, abs=1e-5)
    assert data["scores"] == data["rewards"]
    # Without prompts, with the newline, or padded: the same rewards.
    variants = [texts[0], texts[0] + "\n", texts[0] + "<|endoftext|><|endoftext|>"]
    again = post(live, "/get_reward", {"query": variants}).json()["rewards"]
    assert again == pytest.approx([reference[0]] * 3, abs=1e-5)
    messages = post(live, "/score", {"messages": convs})
    assert messages.json()["rewards"] == pytest.approx(reference, abs=1e-5)
    health = httpx.get(live + "/health").json()
    assert health["reward_convention"]["sequence_end"] == "<|im_end|>\n"


def test_concurrent_requests_are_batched_and_answered(live, rm_export, reference):
    texts, _, _ = queries(rm_export)
    results: dict[int, list[float]] = {}

    def one(i: int) -> None:
        results[i] = post(live, "/get_reward", {"query": [texts[i % 3]]}).json()["rewards"]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results[i] == pytest.approx([reference[i % 3]], abs=1e-5) for i in range(12))


def test_bad_requests_get_their_status_and_one_line_reason(live, rm_export):
    texts, _, _ = queries(rm_export)
    cases = [
        (post(live, "/get_reward", b"{not json"), 400, "malformed JSON"),
        (post(live, "/get_reward", {"prompts": []}), 400, "'query'"),
        (post(live, "/get_reward", {"query": "one string"}), 400, "must be a list"),
        (post(live, "/get_reward", {"query": [texts[0]] * 9}), 413, "--max-sequences 8"),
        (post(live, "/get_reward", {"query": ["no header at all"]}), 400, "query[0]"),
        (post(live, "/get_reward", {"query": [texts[0] + " word" * 200]}), 413, "--seq-length 128"),
        (post(live, "/get_reward", b"x" * 30000), 413, "--max-body-bytes 20000"),
        (post(live, "/score", {"messages": [[{"role": "user", "content": "hi"}]]}), 400,
         "assistant response"),
        (post(live, "/get_reward", {"query": [texts[0]]}, key=None), 401, "API key"),
        (post(live, "/get_reward", {"query": [texts[0]]}, key="wrong"), 401, "API key"),
    ]  # fmt: skip
    for response, status, needle in cases:
        assert response.status_code == status, response.text
        reason = response.json()["error"]
        assert needle in reason and "\n" not in reason
    # OpenRLHF sends no headers: the key may come in the URL.
    ok = httpx.post(f"{live}/get_reward?api_key={KEY}", json={"query": [texts[0]]}, timeout=60)
    assert ok.status_code == 200
    ok = httpx.post(live + "/get_reward", json={"query": []}, headers={"X-API-Key": KEY})
    assert ok.json()["rewards"] == []


def test_a_client_that_disconnects_does_not_stall_others(live, rm_export, reference):
    texts, _, _ = queries(rm_export)
    port = int(live.rsplit(":", 1)[1])
    body = json.dumps({"query": [texts[0]] * 8}).encode()
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(
            b"POST /get_reward HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        sock.close()  # gone before the answer
    start = time.time()
    got = post(live, "/get_reward", {"query": [texts[1]]})
    assert got.json()["rewards"] == pytest.approx([reference[1]], abs=1e-5)
    assert time.time() - start < 30


def test_non_loopback_host_needs_a_key(rm_export):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-m", "megarm.serve", "--load", str(rm_export), "--host", "0.0.0.0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--api-key" in done.stderr and "--no-auth" in done.stderr


def test_normalisation_uses_the_stored_statistics():
    from megarm.checkpoint.metadata import RewardInfo
    from megarm.errors import ScoringError
    from megarm.serve import ModelLoop, create_app

    assert RewardInfo(mean=1.0, std=2.0).normalize([3.0, -1.0]) == [1.0, -1.0]
    with pytest.raises(ScoringError, match="megarm.reward_stats"):  # refused at start-up
        create_app(ModelLoop(None), None, RewardInfo(), model_name="m", normalize=True)


@pytest.mark.slow
def test_sigterm_finishes_the_request_in_flight(rm_export, reference):
    texts, _, _ = queries(rm_export)
    # A long batching window keeps the request in flight when SIGTERM arrives.
    with server("--load", str(rm_export), "--batch-wait-ms", "1500") as (url, proc):
        answer: dict = {}

        def ask() -> None:
            answer["r"] = httpx.post(url + "/get_reward", json={"query": texts}, timeout=60)

        thread = threading.Thread(target=ask)
        thread.start()
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGTERM)
        thread.join(60)
        assert proc.wait(60) == 0
    assert answer["r"].status_code == 200
    assert answer["r"].json()["rewards"] == pytest.approx(reference, abs=1e-5)


@pytest.mark.slow
def test_tp2_checkpoint_served_by_torchrun(rm_checkpoint, rm_export, reference):
    texts, prompts, _ = queries(rm_export)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port())]  # fmt: skip
    args = ["--load", str(rm_checkpoint), "--tensor-model-parallel-size", "2"]
    with server(*args, launcher=launcher) as (url, proc):
        assert httpx.get(url + "/health").json()["ranks"] == 2
        for _ in range(2):  # the followers keep serving after the first request
            got = httpx.post(url + "/get_reward", json={"query": texts, "prompts": prompts},
                             timeout=120)  # fmt: skip
            assert got.json()["rewards"] == pytest.approx(reference, abs=1e-5)
        # torchrun forwards SIGTERM to its workers (and exits non-zero itself, as it
        # does for any signal): rank 0 drains and releases rank 1, all exit.
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log = proc.stdout.read()
        assert "Application shutdown complete" in log, log[-3000:]


@pytest.mark.parametrize("std", [float("nan"), 0.0, -1.0, float("inf")])
def test_unusable_statistics_are_refused_at_start_up(std):
    """A NaN std answered every request with null rewards; 0 died with a
    ZeroDivisionError traceback (issue #25): both are refused before serving."""
    from megarm.checkpoint.metadata import RewardInfo
    from megarm.errors import ScoringError
    from megarm.serve import ModelLoop, create_app

    with pytest.raises(ScoringError, match="unusable"):
        create_app(ModelLoop(None), None, RewardInfo(mean=0.5, std=std), model_name="m",
                   normalize=True)


def test_deeply_nested_json_is_a_400_not_a_500():
    """Issue #25: 600 KB of nested ``[`` was a plain-text 500 and a RecursionError."""
    from fastapi.testclient import TestClient

    from megarm.checkpoint.metadata import RewardInfo
    from megarm.serve import ModelLoop, create_app

    app = create_app(ModelLoop(None), None, RewardInfo(), model_name="m")
    with TestClient(app) as client:
        answer = client.post("/get_reward", content=b"[" * 600_000)
    assert answer.status_code == 400
    assert answer.json() == {"error": "malformed JSON: nested too deeply"}


def test_a_body_that_never_arrives_is_dropped_after_the_deadline():
    """Issue #25 (weak): a client sending headers and part of a body held its
    request open indefinitely; the body now has a deadline (408)."""
    import asyncio

    from megarm.serve import Problem, read_json

    class Slow:
        headers = {"content-length": "100"}

        async def stream(self):
            yield b'{"query": ['
            await asyncio.sleep(60)

    async def read():
        return await read_json(Slow(), 1 << 20, seconds=0.2)

    with pytest.raises(Problem) as info:
        asyncio.run(read())
    assert info.value.status == 408
