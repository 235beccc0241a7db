"""HTTP hardening: header size limits, a deadline for request heads (slowloris), a cap on
connections per address, and no stack trace in any response, whatever the request."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from tests.conftest import campaign_id, claim, client_gc_paused, create_campaign
from tests.servers import Gateway, RedisServer, private_stack

HEAD_TIMEOUT_S = 1.5


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory,
            redis_server: RedisServer) -> Iterator[Gateway]:
    """One worker (so per-address counts are one worker's), a short head deadline, a small
    per-address connection cap, and a log that shows malformed requests."""
    gw = Gateway(redis_server.url, Path(tmp_path_factory.mktemp("guarded")), workers=1,
                 header_timeout_s=str(HEAD_TIMEOUT_S), body_timeout_s=str(HEAD_TIMEOUT_S),
                 connections_per_ip="5", log_level="INFO")
    gw.start()
    yield gw
    gw.stop()


async def raw(gw: Gateway, data: bytes, *, source: str = "127.0.0.1",
              timeout_s: float = 5.0) -> bytes:
    """Send raw bytes and read until the server closes (or the timeout)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port,
                                                   local_addr=(source, 0))
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout_s):
            return await reader.read(1 << 20)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def split(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip()
               for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split(" ")[1]), headers, body


def assert_problem_without_trace(response: bytes, status: int) -> dict[str, Any]:
    got, headers, body = split(response)
    assert b"Traceback" not in response and b'File "' not in response, response
    assert got == status, response
    assert headers["content-type"].startswith("application/problem+json"), response
    doc: dict[str, Any] = msgspec.json.decode(body)
    assert doc["status"] == status and doc["code"], doc
    return doc


# ---- limits --------------------------------------------------------------------------------

async def test_oversized_and_too_many_headers(guarded: Gateway) -> None:
    long_field = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n"
    assert_problem_without_trace(await raw(guarded, long_field), 400)
    long_line = b"GET /healthz?" + b"q" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    assert_problem_without_trace(await raw(guarded, long_line), 400)
    many = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(
        b"X-H%d: v\r\n" % i for i in range(80)) + b"\r\n"
    assert_problem_without_trace(await raw(guarded, many), 400)
    # a big identity token is fine: it fits in one field
    ok = b"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + b"t" * 4000 + (
        b"\r\nConnection: close\r\n\r\n")
    assert split(await raw(guarded, ok))[0] == 200


@pytest.mark.parametrize("request_bytes", [
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/9.9\r\n\r\n",
    b"G\x00T /healthz HTTP/1.1\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header: v\r\n\r\n",
    b"POST /v1/campaigns/x/claims HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
    b"POST /v1/campaigns/x/claims HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
    b"Content-Length: 2\r\n\r\nab",
    b"POST /v1/campaigns/x/claims HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"zz\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS hello on the plain port
])
async def test_unparsable_requests_get_a_problem_document(
    guarded: Gateway, request_bytes: bytes
) -> None:
    assert_problem_without_trace(await raw(guarded, request_bytes), 400)


async def test_malformed_header_is_not_echoed_or_logged(guarded: Gateway) -> None:
    """aiohttp quotes the offending line in its parse errors; a token in it must not come
    back or reach the log."""
    secret = "eyJhbGciOiJIUzI1NiJ9.c2VjcmV0LXRva2Vu.c2ln"
    for line in (f"Authorization: Bearer {secret}\x01", f"Authorization Bearer {secret}"):
        request = f"GET /healthz HTTP/1.1\r\nHost: x\r\n{line}\r\n\r\n".encode()
        response = await raw(guarded, request)
        assert_problem_without_trace(response, 400)
        assert secret.encode() not in response
    log = (guarded.dir / "gateway.log").read_text()
    assert "malformed request" in log and secret not in log


async def test_unexpected_error_is_a_500_problem_without_trace(
    guarded: Gateway, redis_server: RedisServer
) -> None:
    """A campaign whose stored spec is corrupt: the handler fails unexpectedly; the client
    sees a 500 problem document with a request id, the log has the trace."""
    cid = campaign_id("corrupt")
    c = redis_server.client()
    try:
        c.hset(f"fc:{{c:{cid}}}:meta", mapping={"spec": "{not json", "status": "live"})
    finally:
        c.close()
    for accept in ("application/json", "text/html"):
        request = (f"GET /v1/campaigns/{cid}/claims/mine HTTP/1.1\r\nHost: x\r\n"
                   f"Accept: {accept}\r\nConnection: close\r\n\r\n").encode()
        doc = assert_problem_without_trace(await raw(guarded, request), 500)
        assert doc["code"] == "internal" and doc["request_id"]
    log = (guarded.dir / "gateway.log").read_text()
    assert f"request_id={doc['request_id']}" in log and "Traceback" in log


# ---- connections ---------------------------------------------------------------------------

async def test_incomplete_head_is_cut_at_the_deadline(guarded: Gateway) -> None:
    started = time.monotonic()
    partial = b"POST /v1/campaigns/x/claims HTTP/1.1\r\nHost: x\r\nX-Slow: "
    assert await raw(guarded, partial, timeout_s=10) == b""  # closed, nothing answered
    assert HEAD_TIMEOUT_S - 0.2 <= time.monotonic() - started < HEAD_TIMEOUT_S + 3
    # a connection that never says anything goes the same way
    started = time.monotonic()
    assert await raw(guarded, b"", timeout_s=10) == b""
    assert time.monotonic() - started < HEAD_TIMEOUT_S + 3


async def test_kept_alive_connection_outlives_the_deadline(guarded: Gateway) -> None:
    """The deadline is for heads in progress, not for idle kept-alive connections; and a
    later head on the same connection gets its own deadline."""
    reader, writer = await asyncio.open_connection("127.0.0.1", guarded.port)
    try:
        for _ in range(2):
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            await reader.readexactly(int(split(head)[1]["content-length"]))
            await asyncio.sleep(HEAD_TIMEOUT_S + 0.7)  # idle past the deadline: still open
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # an unfinished head
        await writer.drain()
        started = time.monotonic()
        async with asyncio.timeout(HEAD_TIMEOUT_S + 5):
            assert await reader.read(1024) == b""
        assert time.monotonic() - started < HEAD_TIMEOUT_S + 3
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def test_trickled_body_gets_408_and_the_connection_closes(
    guarded: Gateway, http: aiohttp.ClientSession
) -> None:
    c = await create_campaign(http, guarded)
    token = guarded.token("trickler")
    head = (f"POST /v1/campaigns/{c['id']}/claims HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
            "Content-Length: 100\r\n\r\n{").encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", guarded.port)
    try:
        started = time.monotonic()
        writer.write(head)
        async with asyncio.timeout(HEAD_TIMEOUT_S + 5):
            response = await reader.read()  # to the close
        assert time.monotonic() - started < HEAD_TIMEOUT_S + 3
    finally:
        writer.close()
    assert assert_problem_without_trace(response, 408)["code"] == "timeout"


@contextlib.asynccontextmanager
async def held(gw: Gateway, source: str, n: int) -> AsyncIterator[list[asyncio.StreamWriter]]:
    writers = []
    try:
        for _ in range(n):
            _, w = await asyncio.open_connection("127.0.0.1", gw.port, local_addr=(source, 0))
            writers.append(w)
        yield writers
    finally:
        for w in writers:
            w.close()


async def test_connections_per_address_are_capped(guarded: Gateway) -> None:
    get = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    async with held(guarded, "127.0.0.2", 5):
        await asyncio.sleep(0.2)
        doc = assert_problem_without_trace(await raw(guarded, get, source="127.0.0.2"), 503)
        assert doc["code"] == "too_many_connections"
        assert split(await raw(guarded, get, source="127.0.0.3"))[0] == 200
    await asyncio.sleep(0.3)  # closed: the address may connect again
    assert split(await raw(guarded, get, source="127.0.0.2"))[0] == 200


# ---- slowloris -----------------------------------------------------------------------------

async def claim_latencies(http: aiohttp.ClientSession, gw: Gateway, cid: str, prefix: str,
                          n: int, concurrency: int) -> list[float]:
    tokens = [gw.token(f"{prefix}-{i}") for i in range(n)]
    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def one(token: str) -> None:
        async with sem:
            started = time.perf_counter()
            status, body, _ = await claim(http, gw, cid, token)
            latencies.append(time.perf_counter() - started)
            assert status == 201, body

    with client_gc_paused():
        await asyncio.gather(*[one(t) for t in tokens])
    return sorted(latencies)


def p99(xs: list[float]) -> float:
    return xs[min(len(xs) - 1, int(len(xs) * 0.99))]


@contextlib.asynccontextmanager
async def slow_sockets(port: int, sockets: int) -> AsyncIterator[list[int]]:
    """tests/slowloris.py in its own process (so its event loop does not slow the client
    that measures); yields a list that receives how often the server cut a socket."""
    attacker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.slowloris", str(port), str(sockets),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert attacker.stdin is not None and attacker.stdout is not None
    cuts: list[int] = []
    try:
        assert await attacker.stdout.readline() == b"ready\n"
        await asyncio.sleep(2.5)  # every socket open, the first ones already cut
        yield cuts
    finally:
        attacker.stdin.close()
        out, _ = await attacker.communicate()
        cuts.append(int(out.split()[-1]))


async def test_slowloris_does_not_stop_legitimate_claims(tmp_path: Path) -> None:
    """400 slow sockets against 2 workers: legitimate claims keep their p99 within 2x the
    undisturbed figure. Undisturbed and disturbed runs alternate, three of each, so that
    the machine's other load falls on both alike."""
    rounds, n, concurrency = 3, 500, 16
    calm: list[float] = []
    stormy: list[float] = []
    cuts = 0
    with private_stack(tmp_path / "redis", tmp_path / "gw", workers=2,
                       header_timeout_s="2") as (_, gw):
        conn = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=conn) as http:
            c = await create_campaign(http, gw, stock=2 * rounds * n + 200)
            await claim_latencies(http, gw, c["id"], "warm", 200, concurrency)
            for r in range(rounds):
                calm += await claim_latencies(http, gw, c["id"], f"calm{r}", n, concurrency)
                async with slow_sockets(gw.port, 400) as cut:
                    stormy += await claim_latencies(http, gw, c["id"], f"storm{r}", n,
                                                    concurrency)
                cuts += cut[0]
                await asyncio.sleep(0.5)  # the attacker's sockets gone before the next calm run
    calm.sort()
    stormy.sort()
    print(f"claim p99 undisturbed {p99(calm) * 1000:.1f} ms, under slowloris "
          f"{p99(stormy) * 1000:.1f} ms ({len(calm)} claims each); slow sockets cut {cuts}")
    assert cuts > 0  # the deadline did its work during the measurement
    assert p99(stormy) <= 2 * p99(calm)
