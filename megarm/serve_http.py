"""The HTTP layer of :mod:`megarm.serve`: what one client may hold, and the request log.

- :class:`Guard` (an ASGI middleware, outermost): a body declared over
  ``max_body_bytes`` is answered 413 before it is read, a chunked one as soon as it
  crosses the limit; a body must arrive within ``body_seconds`` of the request (408).
  A response sent before the body ended carries ``Connection: close``; the rest of
  the upload is then read and thrown away (at most ``discard_bytes``, within the same
  deadline) before the connection closes, so a client that only reads the answer
  once its upload is done (``urllib``, ``requests``) reads the 413 instead of a reset
  connection. Each request is logged in one line (method, path, status, items, ms).
- :class:`GuardedH11Protocol` (uvicorn's h11 protocol): a request's headers must be
  complete within ``header_seconds`` of the connection (or of the previous response),
  else 408 and close; at most ``max_connections`` connections are open, the next ones
  are answered 503 and closed at once.

With uvicorn's idle keep-alive timeout and h11's header size limit
(:func:`server_config`), no connection outlives its deadlines, however slowly it sends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from dataclasses import dataclass
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("megarm.serve")

Scope = dict[str, Any]
Message = dict[str, Any]


class Problem(Exception):
    """A request the server answers with ``status`` and a one-line ``reason``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class Limits:
    """What one request, and one client, may ask for or hold."""

    max_body_bytes: int = 8 << 20
    max_sequences: int = 256
    body_seconds: float = 30.0
    """How long a client may take to send its body, from the end of its headers."""
    header_seconds: float = 10.0
    """How long a client may take to send a request's headers."""
    keep_alive_seconds: float = 5.0
    """How long an idle connection stays open between requests."""
    max_connections: int = 1000
    """Open connections at most; the next ones are answered 503 and closed."""
    max_header_bytes: int = 16 << 10
    """A request line plus headers over this is refused (h11's incomplete-event limit)."""
    discard_bytes: int = 64 << 20
    """After an early answer (413, 401, ...), up to this much of the rest of the upload
    is read and dropped so the client can read the answer; then the connection closes."""


def _error(status: int, reason: str) -> tuple[Message, Message]:
    body = json.dumps({"error": reason}).encode()
    start = {
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())],
    }  # fmt: skip
    return start, {"type": "http.response.body", "body": body, "more_body": False}


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class _Exchange:
    """One request as the guard sees it: the body read so far and the deadline."""

    def __init__(self, scope: Scope, receive: Any, send: Any, limits: Limits) -> None:
        self.scope, self._receive, self._send, self.limits = scope, receive, send, limits
        self.deadline = time.monotonic() + limits.body_seconds
        self.received = 0
        self.status: int | None = None
        # Set when the body broke a bound: the app's own answer (whatever its
        # middleware made of the exception) is dropped and this one sent instead.
        self.problem: Problem | None = None
        self._own = False
        length = _header(scope, b"content-length")
        self.length = int(length) if length and length.strip().isdigit() else None
        # h11: no Content-Length and no Transfer-Encoding means no body.
        self.done = not (self.length or _header(scope, b"transfer-encoding"))

    async def _next(self) -> Message:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        return await asyncio.wait_for(self._receive(), remaining)

    def _count(self, message: Message) -> None:
        if message["type"] != "http.request":  # http.disconnect: nothing more comes
            self.done = True
            return
        self.received += len(message.get("body", b""))
        if not message.get("more_body", False):
            self.done = True

    async def receive(self) -> Message:
        """The app's ``receive``: the body within its deadline and size limit."""
        if self.done:
            return await self._receive()
        try:
            message = await self._next()
        except TimeoutError:
            self.problem = Problem(
                408, f"request body not received within {self.limits.body_seconds:g} s "
                "(--body-timeout)"
            )
            raise self.problem from None
        self._count(message)
        if self.received > self.limits.max_body_bytes:
            self.problem = Problem(
                413, f"request body exceeds --max-body-bytes {self.limits.max_body_bytes}"
            )
            raise self.problem
        return message

    async def send(self, message: Message) -> None:
        """The app's ``send``: an answer before the body ended closes the connection,
        after the rest of the upload (bounded) has been read and dropped."""
        if self.problem is not None and not self._own:
            return
        if message["type"] == "http.response.start":
            self.status = message["status"]
            if not self.done:
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"connection", b"close")]}  # fmt: skip
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            if not self.done:
                # The whole answer goes out now; the end-of-response (which makes uvicorn
                # close the connection) waits until the upload is drained.
                if message.get("body"):
                    await self._send({**message, "more_body": True})
                await self._drain()
                message = {"type": "http.response.body", "body": b"", "more_body": False}
        await self._send(message)

    async def _drain(self) -> None:
        dropped = 0
        while not self.done and dropped <= self.limits.discard_bytes:
            try:
                message = await self._next()
            except TimeoutError:
                return
            before = self.received
            self._count(message)
            dropped += self.received - before

    async def refuse(self, status: int, reason: str) -> None:
        """Answer with ``status`` and a one-line ``{"error": reason}`` (the app's own
        answer, if any follows, is dropped)."""
        self._own = True
        start, body = _error(status, reason)
        await self.send(start)
        await self.send(body)


class Guard:
    """ASGI middleware: body limits and deadline, early answers readable, one log line
    per request. Wraps the whole app (lifespan and other scopes pass through)."""

    def __init__(self, app: Any, limits: Limits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        exchange = _Exchange(scope, receive, send, self.limits)
        try:
            await self._run(scope, exchange)
        finally:
            items = scope.get("state", {}).get("items", "-")
            log.info(
                "%s %s %s items=%s %.1fms", scope.get("method"), scope.get("path"),
                exchange.status if exchange.status is not None else "-", items,
                (time.monotonic() - started) * 1000,
            )  # fmt: skip

    async def _run(self, scope: Scope, exchange: _Exchange) -> None:
        limit = self.limits.max_body_bytes
        if exchange.length is not None and exchange.length > limit:
            await exchange.refuse(
                413, f"request body of {exchange.length} bytes exceeds --max-body-bytes {limit}"
            )
            return
        try:
            await self.app(scope, exchange.receive, exchange.send)
        except Exception:  # noqa: BLE001 - the client gets a 500, the log the traceback
            if exchange.problem is None:
                log.exception("%s %s failed", scope.get("method"), scope.get("path"))
                if exchange.status is None:
                    await exchange.refuse(500, "internal error (see the server log)")
        if exchange.problem is not None and not exchange._own:
            await exchange.refuse(exchange.problem.status, exchange.problem.reason)


def _raw_response(status: int, reason: str) -> bytes:
    body = json.dumps({"error": reason}).encode()
    phrase = {408: "Request Timeout", 503: "Service Unavailable"}[status]
    return (
        f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline and a connection cap (uvicorn has
    neither: a client sending half a request line held its connection forever)."""

    header_seconds: float = Limits.header_seconds
    max_connections: int = Limits.max_connections
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            log.warning("refused a connection: %d open (--max-connections)", len(self.connections) - 1)
            transport.write(_raw_response(503, "too many connections (--max-connections)"))
            transport.close()
            return
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_seconds, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            # Nothing to answer with h11 (no request yet): a raw 408, then close.
            self.transport.write(_raw_response(
                408, f"request headers not received within {self.header_seconds:g} s "
                "(--header-timeout)"))  # fmt: skip
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self._header_timer is not None and self.conn.their_state is not h11.IDLE:
            self._cancel_header_timer()  # the headers are in; the body has its own deadline

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_header_timer()  # the next request's headers

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)


def guarded_protocol(limits: Limits) -> type[GuardedH11Protocol]:
    """:class:`GuardedH11Protocol` with ``limits``' header deadline and connection cap."""
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {"header_seconds": limits.header_seconds, "max_connections": limits.max_connections},
    )


def fit_file_limit(limits: Limits, spare: int = 64) -> Limits:
    """``limits`` with ``max_connections`` within the process's open-file limit: the
    soft limit is raised towards the hard one if needed; what is still missing lowers
    ``max_connections`` (with a warning) rather than failing on accept later."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = limits.max_connections + spare
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < need:
        allowed = max(1, soft - spare)
        log.warning(
            "ulimit -n is %d: serving at most %d connections (--max-connections %d)",
            soft, allowed, limits.max_connections,
        )  # fmt: skip
        limits = Limits(**{**limits.__dict__, "max_connections": allowed})
    return limits


def server_config(
    app: Any, host: str, port: int, limits: Limits, log_level: str = "info",
    graceful_seconds: float = 60.0,
) -> uvicorn.Config:
    """uvicorn's configuration with every per-connection bound of ``limits``."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=guarded_protocol(limits),
        log_level=log_level,
        access_log=False,  # Guard logs one line per request instead
        timeout_keep_alive=limits.keep_alive_seconds,  # type: ignore[arg-type]
        # The cap is enforced at accept (GuardedH11Protocol); uvicorn's own check
        # (503 per request) only backs it up.
        limit_concurrency=limits.max_connections + 1,
        h11_max_incomplete_event_size=limits.max_header_bytes,
        timeout_graceful_shutdown=graceful_seconds,  # type: ignore[arg-type]
    )
