"""Connection-level protections aiohttp lacks: a deadline for each request head (slowloris),
a cap on concurrent connections per address, size limits on the request line and headers,
and problem documents (never a traceback) for what fails before the app sees a request."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any, cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from gateway.errors import BadRequest, Problem, TooManyConnections
from gateway.http.peer import PeerResolver
from gateway.http.problems import problem_response
from gateway.schemas import ProblemDocument, encoder
from gateway.settings import Settings

MAX_HEADERS = 64
# after answering a request whose body was not read (413, 408), aiohttp reads and drops
# the rest for this long before closing (10 s by default: a trickler's gift)
LINGER_S = 2.0


def handler_limits(settings: Settings) -> dict[str, Any]:
    """aiohttp's parser limits (longer lines or fields, or more headers, are a 400) and its
    lingering close."""
    return {"max_line_size": settings.header_max, "max_field_size": settings.header_max,
            "max_headers": MAX_HEADERS, "lingering_time": LINGER_S}


def _canned(p: Problem) -> bytes:
    body = encoder.encode(ProblemDocument(type="urn:flashclaim:problem:" + p.code,
                                          title=p.title, status=p.status, detail=p.detail,
                                          code=p.code, retry_after_s=1))
    return (f"HTTP/1.1 {p.status} {p.title}\r\nContent-Type: application/problem+json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
            ).encode() + body


class ConnectionGuard:
    """Per-worker state: open connections per peer address (proxies exempt)."""

    def __init__(self, settings: Settings, peers: PeerResolver) -> None:
        self.head_timeout_s = settings.header_timeout_s
        self.per_ip = settings.connections_per_ip
        self._peers = peers
        self.open: Counter[str] = Counter()
        self.refusal = _canned(TooManyConnections(
            "Too many open connections from this address; close some and retry"))

    def admit(self, addr: str) -> bool:
        """Count the connection; False when it is one too many (it stays counted until
        released, like any other)."""
        if self.per_ip <= 0 or self._peers.is_trusted(addr):
            return True
        self.open[addr] += 1
        return self.open[addr] <= self.per_ip

    def release(self, addr: str) -> None:
        if addr in self.open:
            self.open[addr] -= 1
            if self.open[addr] <= 0:
                del self.open[addr]


class GuardedHandler(RequestHandler):
    """aiohttp's connection protocol plus a head deadline and the per-address cap.

    A request head must be complete within `head_timeout_s` of the connection opening, and
    of the first byte of each later head on a kept-alive connection; otherwise the
    connection is closed. Idle kept-alive connections are left to aiohttp's keep-alive
    timeout. Reads aiohttp's `_request_count`, `_request_in_progress` and `_messages`
    (aiohttp is pinned; tests/test_hardening.py covers the behaviour)."""

    def __init__(self, manager: web.Server, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._addr: str | None = None
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        addr = peer[0] if isinstance(peer, tuple) else ""
        self._addr = addr
        if not self._guard.admit(addr):
            cast(asyncio.Transport, transport).write(self._guard.refusal)
            self.force_close()
            return
        self._arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        if self._addr is not None:
            self._guard.release(self._addr)
            self._addr = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # on every read of every connection: kept to a few attribute reads (profiled)
        before = self._request_count
        RequestHandler.data_received(self, data)
        if self._request_count != before:
            if self._deadline is not None:  # a head completed
                self._deadline.cancel()
                self._deadline = None
        elif (data and self._deadline is None and not self._request_in_progress
              and not self._messages):
            self._arm()  # the first bytes of a new head on a kept-alive connection

    def _arm(self) -> None:
        if self._guard.head_timeout_s > 0:
            count = self._request_count
            self._deadline = self._loop.call_later(
                self._guard.head_timeout_s, self._expire, count)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self, count: int) -> None:
        self._deadline = None
        if self._request_count == count and not self._request_in_progress:
            self.force_close()

    def handle_error(
        self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """What aiohttp answers itself (an unparsable request): a problem document."""
        if request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        if status == 400:
            # aiohttp's message quotes the offending line, which may hold a token: only its
            # first line (what was wrong) goes to the client and the log
            what = (message or "bad request").split("\n", 1)[0].rstrip(":")
            p: Problem = BadRequest(f"Malformed HTTP request: {what}")
            self.logger.info("malformed request from %s: %s", request.remote, what)
        else:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
            p = Problem("An unexpected error occurred")
            p.status = status  # type: ignore[misc]
        resp = problem_response(p)
        resp.force_close()
        return resp


class GuardedSite(web.BaseSite):
    """A TCP site (SO_REUSEPORT) whose connections are GuardedHandlers."""

    __slots__ = ("_guard", "_host", "_kwargs", "_port")

    def __init__(self, runner: web.BaseRunner, host: str, port: int, guard: ConnectionGuard,
                 *, backlog: int = 4096, **handler_kwargs: Any) -> None:
        super().__init__(runner, backlog=backlog)
        self._host, self._port, self._guard = host, port, guard
        self._kwargs = handler_kwargs

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None

        def protocol() -> GuardedHandler:
            assert server is not None
            return GuardedHandler(server, self._guard, loop=loop, **self._kwargs)

        self._server = await loop.create_server(
            protocol, self._host, self._port, backlog=self._backlog, reuse_port=True)
