"""A reward server for RLHF: OpenRLHF's ``/get_reward`` protocol, chat messages, health.

    python -m megarm.serve --load EXPORT_OR_CKPT [--port 5000] [--normalize]
    torchrun --nproc_per_node N -m megarm.serve --load CKPT --tensor-model-parallel-size T

Endpoints (FastAPI on uvicorn):

- ``POST /get_reward`` — OpenRLHF's remote reward model (``--remote_rm_url``): request
  ``{"query": [text, ...], "prompts": [...], "labels": [...]}``, where each query is
  the chat-formatted prompt and response (``prompts``, optional, tell where the
  prompt ends; ``labels`` are ignored); response ``{"rewards": [...], "scores":
  [...], "extra_logs": {...}}``, as OpenRLHF's ``openrlhf/utils/agent.py`` reads it.
- ``POST /score`` — ``{"messages": [[{"role": ..., "content": ...}, ...], ...]}``, each
  conversation ending with the assistant turn to score; response ``{"rewards": [...]}``.
- ``GET /health`` — the model, its reward convention and the server's limits.

Every input is put into the model's reward convention (:mod:`megarm.rewards.encoding`) whether
it ends at ``<|im_end|>``, at ``<|im_end|>\\n``, with padding or cut off. Concurrent
requests are batched: the rows waiting when the model frees up are scored together in
micro-batches of at most ``--max-batch-tokens`` padded tokens, longest first.
``--normalize`` returns ``(r - mean) / std`` with the model's stored statistics.

Safe by default: it binds 127.0.0.1; any other ``--host`` needs ``--api-key KEY``
(sent as ``Authorization: Bearer KEY``, ``X-API-Key: KEY`` or ``?api_key=KEY``, the
last for clients such as OpenRLHF that send no headers) or an explicit
``--no-auth``. A body over ``--max-body-bytes``, more than ``--max-sequences`` per
request or a sequence that cannot fit ``--seq-length`` is a 413, malformed JSON or a
malformed request a 400, a missing or wrong key a 401, each with a one-line
``{"error": ...}``. A client that disconnects leaves the batch; SIGTERM stops
accepting, finishes the requests in flight and exits. Under torchrun, rank 0 speaks
HTTP and feeds the other ranks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import queue
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from megarm import cli
from megarm.checkpoint.metadata import RewardInfo
from megarm.data.handlers import RecordError
from megarm.errors import ScoringError
from megarm.rewards.attributes import Attributes
from megarm.rewards.backends import Scorer, open_scorer
from megarm.rewards.encoding import Encoder
from megarm.serve_http import Guard, Limits, Problem, fit_file_limit, server_config

# Idle followers wait in a collective with a timeout; the driver pings them this often.
PING_SECONDS = 60.0
LOOPBACK_NAMES = ("localhost",)
LOG_LEVELS = ("debug", "info", "warning", "error")


class ServeError(ScoringError):
    """The server cannot start as asked; the message says what to pass."""




# --------------------------------------------------------------------------- batching


class ModelLoop:
    """Runs the scorer on the thread that calls :meth:`run` (the main thread).

    megatron-core's CPU layer and the CUDA current device are per thread, and every
    rank must issue its collectives from one thread, so the model never runs on the
    HTTP server's threads: the event loop hands waves of rows over a queue.
    """

    def __init__(self, scorer: Scorer) -> None:
        self.scorer = scorer
        self.jobs: queue.Queue[tuple[list[list[int]], Future] | None] = queue.Queue()

    async def rewards(self, rows: list[list[int]]) -> list[float | list[float]]:
        """(Event loop) the head's outputs for ``rows`` (rewards, or a regression
        head's attribute values), computed on the model thread."""
        future: Future = Future()
        self.jobs.put((rows, future))
        return await asyncio.wrap_future(future)

    def stop(self) -> None:
        """Let :meth:`run` return once the jobs before this call are done."""
        self.jobs.put(None)

    def run(self, alive: Callable[[], bool] = lambda: True) -> None:
        """Serve jobs until :meth:`stop` (or until ``alive()`` turns false); ping idle
        followers now and then so their collectives do not time out."""
        idle = 0.0
        while True:
            try:
                job = self.jobs.get(timeout=1.0)
            except queue.Empty:
                if not alive():
                    return
                idle += 1.0
                if idle >= PING_SECONDS:
                    self.scorer.ping()
                    idle = 0.0
                continue
            idle = 0.0
            if job is None:
                return
            rows, future = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                # The head's outputs: a reward each, or a regression head's attributes.
                future.set_result(self.scorer.outputs(rows))
            except Exception as exc:  # noqa: BLE001 - the waiting requests hear of it
                future.set_exception(exc)


@dataclass
class _Job:
    rows: list[list[int]]
    future: asyncio.Future


class Batcher:
    """Scores the rows of concurrent requests together, one wave at a time (the model
    micro-batches a wave by tokens); a request whose client left is dropped before
    its wave runs."""

    def __init__(self, model: ModelLoop, wait_seconds: float = 0.002) -> None:
        self.model = model
        self.wait_seconds = wait_seconds
        self.queue: asyncio.Queue[_Job | None] = asyncio.Queue()
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Finish what is queued, then stop."""
        await self.queue.put(None)
        if self.task is not None:
            await self.task

    def submit(self, rows: list[list[int]]) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait(_Job(rows, future))
        return future

    async def _run(self) -> None:
        stopping = False
        while not stopping:
            first = await self.queue.get()
            jobs = [] if first is None else [first]
            stopping = first is None
            if jobs and self.wait_seconds:
                await asyncio.sleep(self.wait_seconds)  # let concurrent requests join
            while not self.queue.empty():
                job = self.queue.get_nowait()
                if job is None:
                    stopping = True
                else:
                    jobs.append(job)
            jobs = [j for j in jobs if not j.future.done()]  # cancelled: client left
            if not jobs:
                continue
            try:
                rewards = await self.model.rewards([row for job in jobs for row in job.rows])
            except Exception as exc:  # noqa: BLE001 - every waiting request hears of it
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            at = 0
            for job in jobs:
                if not job.future.done():
                    job.future.set_result(rewards[at : at + len(job.rows)])
                at += len(job.rows)


# --------------------------------------------------------------------------- the app


def _authorized(request: Request, key: str) -> bool:
    given = request.headers.get("x-api-key") or request.query_params.get("api_key") or ""
    bearer = request.headers.get("authorization", "")
    if bearer.lower().startswith("bearer "):
        given = bearer[7:].strip()
    return hmac.compare_digest(given.encode(), key.encode())


async def read_json(request: Request, limit: int, seconds: float = 30.0) -> Any:
    """The request body as JSON, refusing more than ``limit`` bytes before reading it
    and a body that takes longer than ``seconds`` to arrive."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise Problem(413, f"request body of {length} bytes exceeds --max-body-bytes {limit}")
    body = bytearray()
    try:
        async with asyncio.timeout(seconds):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise Problem(413, f"request body exceeds --max-body-bytes {limit}")
    except TimeoutError:
        raise Problem(408, f"request body not received within {seconds:g} s") from None
    try:
        return json.loads(body)
    except ValueError as exc:  # includes bad UTF-8
        raise Problem(400, f"malformed JSON: {exc}") from None
    except RecursionError:  # e.g. 600 KB of nested [
        raise Problem(400, "malformed JSON: nested too deeply") from None


def _texts(value: Any, key: str, limits: Limits, count: int | None = None) -> list[Any]:
    if not isinstance(value, list):
        raise Problem(400, f"'{key}' must be a list")
    if count is None and len(value) > limits.max_sequences:
        raise Problem(
            413, f"{len(value)} sequences in '{key}' exceed --max-sequences {limits.max_sequences}"
        )
    if count is not None and len(value) != count:
        raise Problem(400, f"'{key}' has {len(value)} entries, 'query' has {count}")
    return value


def _encode_all(encode: Any, items: list[tuple[Any, ...]], key: str) -> list[list[int]]:
    rows = []
    for i, args in enumerate(items):
        try:
            rows.append(encode(*args))
        except RecordError as exc:
            status = 413 if exc.reason == "too_long" else 400
            raise Problem(status, f"{key}[{i}]: {exc.detail}") from None
    return rows


async def _wait(request: Request, future: asyncio.Future) -> list[float] | None:
    """The rewards, or ``None`` when the client disconnects first (its job is dropped)."""

    async def gone() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.05)

    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({future, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not future.done():
        future.cancel()
        return None
    return future.result()


def _add_guards(app: FastAPI, api_key: str | None) -> None:
    """Problems as JSON errors; every route but ``/health`` behind the API key."""

    @app.exception_handler(Problem)
    async def problem(request: Request, exc: Problem) -> JSONResponse:
        return JSONResponse({"error": exc.reason}, status_code=exc.status)

    @app.middleware("http")
    async def authenticate(request: Request, call_next: Any) -> Any:
        if (
            api_key is not None
            and request.url.path != "/health"
            and not _authorized(request, api_key)
        ):
            return JSONResponse({"error": "missing or wrong API key"}, status_code=401)
        return await call_next(request)


def _add_health(
    app: FastAPI, model: ModelLoop, encoder: Encoder, info: RewardInfo, model_name: str,
    normalize: bool, limits: Limits,
) -> None:
    """``GET /health``: the model, how it reads and normalises rewards, the limits."""

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": model_name,
            "ranks": model.scorer.world,
            "reward_convention": encoder.convention,
            "normalize": normalize,
            "mean": info.mean,
            "std": info.std,
            "seq_length": encoder.seq_length,
            "truncation": encoder.truncation,
            "max_sequences": limits.max_sequences,
            "max_body_bytes": limits.max_body_bytes,
            "header_timeout": limits.header_seconds,
            "body_timeout": limits.body_seconds,
            "keep_alive_timeout": limits.keep_alive_seconds,
            "max_connections": limits.max_connections,
        }


def create_app(
    model: ModelLoop,
    encoder: Encoder,
    info: RewardInfo,
    *,
    model_name: str,
    normalize: bool = False,
    api_key: str | None = None,
    limits: Limits | None = None,
    batch_wait_seconds: float = 0.002,
) -> Guard:
    """The ASGI app serving ``model``: FastAPI (its lifespan owns the batcher and, at
    shutdown, once the requests in flight are answered, stops the model loop) inside
    the :class:`~megarm.serve_http.Guard` that bounds bodies and logs requests."""
    limits = limits or Limits()
    if normalize:
        info.normalize([0.0])  # no statistics: refuse to start, not on the first request
    batcher = Batcher(model, batch_wait_seconds)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            await batcher.stop()
            model.stop()

    app = FastAPI(title="megarm reward server", lifespan=lifespan, docs_url=None, redoc_url=None)

    _add_guards(app, api_key)

    attributes = getattr(model.scorer, "attributes", None) or Attributes()

    async def rewards_for(request: Request, rows: list[list[int]]) -> dict[str, Any] | None:
        """``{"rewards": [...]}`` (the combined scalar of a regression head, which also
        gives ``"attributes": [{name: value}, ...]``), or ``None`` (client gone)."""
        outputs = await _wait(request, batcher.submit(rows)) if rows else []
        if outputs is None:
            return None
        raw = [attributes.reward(v) for v in outputs]
        out: dict[str, Any] = {"rewards": info.normalize(raw) if normalize else raw}
        if attributes.names is not None:
            out["attributes"] = [attributes.named(v) for v in outputs]
        return out

    @app.post("/get_reward")
    async def get_reward(request: Request) -> Any:
        body = await read_json(request, limits.max_body_bytes, limits.body_seconds)
        if not isinstance(body, dict) or "query" not in body:
            raise Problem(400, "expected a JSON object with 'query': [text, ...]")
        queries = _texts(body["query"], "query", limits)
        request.state.items = len(queries)
        prompts = body.get("prompts")
        prompts = (
            [None] * len(queries)
            if prompts is None
            else _texts(prompts, "prompts", limits, len(queries))
        )
        rows = await asyncio.to_thread(
            _encode_all, encoder.text, list(zip(queries, prompts, strict=True)), "query"
        )
        found = await rewards_for(request, rows)
        if found is None:
            return JSONResponse({"error": "client disconnected"}, status_code=499)
        return {**found, "scores": found["rewards"], "extra_logs": {}}

    @app.post("/score")
    async def score(request: Request) -> Any:
        body = await read_json(request, limits.max_body_bytes, limits.body_seconds)
        if not isinstance(body, dict) or "messages" not in body:
            raise Problem(400, "expected a JSON object with 'messages': [[message, ...], ...]")
        conversations = _texts(body["messages"], "messages", limits)
        request.state.items = len(conversations)
        rows = await asyncio.to_thread(
            _encode_all, encoder.conversation, [(c,) for c in conversations], "messages"
        )
        found = await rewards_for(request, rows)
        if found is None:
            return JSONResponse({"error": "client disconnected"}, status_code=499)
        return found

    _add_health(app, model, encoder, info, model_name, normalize, limits)
    return Guard(app, limits)


# --------------------------------------------------------------------------- command line


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m megarm.serve", description=__doc__.split("\n")[0])
    cli.add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--api-key", help="required from clients; needed for a non-loopback --host")
    p.add_argument("--no-auth", action="store_true", help="serve a non-loopback host without a key")
    p.add_argument("--normalize", action="store_true", help="return (r - mean) / std")
    p.add_argument("--max-body-bytes", type=int, default=Limits.max_body_bytes)
    p.add_argument("--max-sequences", type=int, default=Limits.max_sequences, help="per request")
    p.add_argument(
        "--batch-wait-ms", type=float, default=2.0, help="how long a wave waits for more requests"
    )
    p.add_argument(
        "--graceful-timeout", type=float, default=60.0, help="seconds SIGTERM waits for requests"
    )
    slow = p.add_argument_group("slow clients (each connection is bounded in time and count)")
    slow.add_argument("--header-timeout", type=float, default=Limits.header_seconds,
                      help="seconds a client may take to send a request's headers (then 408)")
    slow.add_argument("--body-timeout", type=float, default=Limits.body_seconds,
                      help="seconds a client may take to send a request's body (then 408)")
    slow.add_argument("--keep-alive-timeout", type=float, default=Limits.keep_alive_seconds,
                      help="seconds an idle connection stays open between requests")
    slow.add_argument("--max-connections", type=int, default=Limits.max_connections,
                      help="open connections at most; more are answered 503 and closed")
    slow.add_argument("--max-header-bytes", type=int, default=Limits.max_header_bytes,
                      help="request line and headers at most (then 400)")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS,
                   help="info logs one line per request (method, path, status, items, ms)")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Refuse an unsafe or impossible setup before the model is loaded."""
    if not is_loopback(args.host) and not args.api_key and not args.no_auth:
        raise ServeError(
            f"--host {args.host} accepts connections from other machines: pass --api-key KEY "
            "(clients send it as a Bearer token, X-API-Key or ?api_key=), or --no-auth"
        )
    if args.api_key is not None and not args.api_key.strip():
        raise ServeError("--api-key is empty")
    for name in ("max_body_bytes", "max_sequences", "port", "max_connections",
                 "max_header_bytes"):  # fmt: skip
        if getattr(args, name) < 1:
            raise ServeError(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("header_timeout", "body_timeout", "keep_alive_timeout"):
        if not getattr(args, name) > 0:
            raise ServeError(f"--{name.replace('_', '-')} must be > 0 seconds")


def limits_of(args: argparse.Namespace) -> Limits:
    """The request and connection bounds the command line asks for."""
    return Limits(
        max_body_bytes=args.max_body_bytes,
        max_sequences=args.max_sequences,
        body_seconds=args.body_timeout,
        header_seconds=args.header_timeout,
        keep_alive_seconds=args.keep_alive_timeout,
        max_connections=args.max_connections,
        max_header_bytes=args.max_header_bytes,
    )


def setup_logging(level: str) -> None:
    """The request log (``megarm.serve``) on stderr at ``level``."""
    logger = logging.getLogger("megarm.serve")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False


def serve(args: argparse.Namespace) -> None:
    """Load the model on every rank; rank 0 serves HTTP until SIGTERM or Ctrl-C.

    The model runs on the main thread (:class:`ModelLoop`); uvicorn runs on a thread
    of its own, so SIGTERM is caught here and handed to uvicorn as its graceful exit:
    it stops accepting, answers the requests in flight, then the loop stops.
    """
    check_args(args)
    setup_logging(args.log_level)
    limits = fit_file_limit(limits_of(args))
    scorer, encoder, info = open_scorer(cli.scorer_spec(args))
    with scorer:
        if not scorer.is_driver:
            # torchrun forwards SIGTERM to every rank: rank 0 drains, then releases us.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            scorer.follow()
            return
        model = ModelLoop(scorer)
        app = create_app(
            model,
            encoder,
            info,
            model_name=str(args.load),
            normalize=args.normalize,
            api_key=args.api_key,
            limits=limits,
            batch_wait_seconds=args.batch_wait_ms / 1000,
        )
        config = server_config(
            app, args.host, args.port, limits, args.log_level, args.graceful_timeout
        )
        server = uvicorn.Server(config)
        http = threading.Thread(target=server.run, name="megarm-http", daemon=True)

        def shut_down(signum: int, frame: object) -> None:
            if server.should_exit and signum == signal.SIGINT:
                server.force_exit = True  # a second Ctrl-C
            server.should_exit = True

        signal.signal(signal.SIGTERM, shut_down)
        signal.signal(signal.SIGINT, shut_down)
        http.start()
        print(
            f"serving {args.load} ({scorer.world} rank(s)) on http://{args.host}:{args.port}: "
            "POST /get_reward, POST /score, GET /health",
            flush=True,
        )
        model.run(alive=http.is_alive)
        http.join()
        if not server.started:
            raise ServeError(f"the HTTP server could not start on {args.host}:{args.port}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a bad set-up)."""
    return cli.run_command(build_parser(), serve, argv)


if __name__ == "__main__":
    sys.exit(main())
