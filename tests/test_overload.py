"""10x overload on a Redis slowed by a latency proxy: bounded p99 for admitted claims, fast
503 `overloaded` for shed ones, and no request waiting past its queue deadline."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import pytest

from tests.conftest import client_gc_paused, create_campaign
from tests.proxy import TcpProxy
from tests.servers import Gateway, RedisServer

DELAY_S = 0.025  # added per chunk in each direction: one Redis round trip >= 50 ms
INFLIGHT = 4  # Redis slots of the single worker
QUEUE = 16  # waiters for a slot; beyond: 503 at once
QUEUE_WAIT_S = 0.2  # the longest a claim queues
OVERLOAD = 10  # offered load, in multiples of the measured capacity
LOAD_S = 5.0
SHED_FAST_S = 0.010  # a 503 for a full queue
MARGIN_S = 0.1  # client and scheduling slack on the deadline bounds
STOCK = 1_000_000
QUEUE_FULL = "too many requests waiting"


class ProxyThread:
    """A TcpProxy on an event loop of its own, so the test's load does not delay it."""

    def __init__(self, upstream_port: int, delay_s: float) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.proxy = TcpProxy("127.0.0.1", upstream_port, delay_s=delay_s)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.proxy.port}/0"

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.proxy.__aenter__(), self._loop).result(5)

    def stop(self) -> None:
        done = asyncio.run_coroutine_threadsafe(
            self.proxy.__aexit__(None, None, None), self._loop)
        done.result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


@pytest.fixture
def slow_gateway(tmp_path: Path) -> Iterator[Gateway]:
    """One worker with 4 Redis slots and a 16-deep queue, its Redis 50 ms away."""
    redis = RedisServer(tmp_path / "redis", appendonly=False)
    proxy = ProxyThread(redis.port, DELAY_S)
    gw = Gateway(
        proxy.url, tmp_path / "gateway", workers=1, redis_inflight=str(INFLIGHT),
        redis_queue=str(QUEUE), redis_queue_wait_s=str(QUEUE_WAIT_S), user_rate_per_s="0",
    )
    try:
        redis.start()
        proxy.start()
        gw.start()
        yield gw
    finally:
        gw.stop()
        proxy.stop()
        redis.stop()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as session:
        yield session


class Answer(NamedTuple):
    status: int
    code: str
    detail: str
    retry_after: str | None
    seconds: float


async def post(http: aiohttp.ClientSession, url: str, token: str) -> Answer:
    t0 = time.perf_counter()
    async with http.post(url, headers={"Authorization": f"Bearer {token}"}) as r:
        doc: dict[str, Any] = await r.json(content_type=None)
    took = time.perf_counter() - t0
    return Answer(r.status, str(doc.get("code", "")), str(doc.get("detail", "")),
                  r.headers.get("Retry-After"), took)


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p / 100 * len(s)))] if s else float("nan")


def dist(xs: list[float]) -> str:
    return (f"n={len(xs)} p50={pct(xs, 50) * 1000:.1f} p90={pct(xs, 90) * 1000:.1f} "
            f"p99={pct(xs, 99) * 1000:.1f} max={max(xs, default=0) * 1000:.1f} ms")


async def offered(
    http: aiohttp.ClientSession, url: str, tokens: list[str], rate: float, seconds: float
) -> tuple[list[Answer], float]:
    """Open-loop arrivals at `rate`/s for `seconds`; the answers and the worst loop lag."""
    tasks: list[asyncio.Task[Answer]] = []
    start = time.perf_counter()
    lag = 0.0
    total = int(rate * seconds)
    while len(tasks) < total:
        now = time.perf_counter()
        due = min(total, int((now - start) * rate) + 1)
        lag = max(lag, (now - start) - len(tasks) / rate)
        while len(tasks) < due:
            tasks.append(asyncio.create_task(post(http, url, tokens[len(tasks)])))
        await asyncio.sleep(0.002)
    return list(await asyncio.gather(*tasks)), lag


async def test_ten_times_capacity_keeps_admitted_p99_bounded_and_sheds_fast(
    slow_gateway: Gateway, client: aiohttp.ClientSession
) -> None:
    gw = slow_gateway
    cid = (await create_campaign(client, gw, stock=STOCK))["id"]
    url = f"{gw.base}/v1/campaigns/{cid}/claims"
    warm = [await post(client, url, gw.token(f"warm-{i}")) for i in range(10)]
    assert {a.status for a in warm} == {201}, warm
    rtt = statistics.median(a.seconds for a in warm)  # one claim alone: one round trip
    assert rtt >= 2 * DELAY_S
    capacity = INFLIGHT / rtt
    rate = OVERLOAD * capacity
    tokens = [gw.token(f"u-{i}") for i in range(int(rate * LOAD_S) + 1)]

    with client_gc_paused():
        answers, lag = await offered(client, url, tokens, rate, LOAD_S)

    admitted = [a.seconds for a in answers if a.status == 201]
    shed = [a for a in answers if a.status == 503]
    full = [a.seconds for a in shed if QUEUE_FULL in a.detail]
    timed_out = [a.seconds for a in shed if QUEUE_FULL not in a.detail]
    worst = max(a.seconds for a in answers)
    print(f"\nround trip {rtt * 1000:.1f} ms, capacity {capacity:.0f}/s, offered {rate:.0f}/s "
          f"for {LOAD_S:.0f} s, client loop lag max {lag * 1000:.1f} ms")
    print(f"admitted {len(admitted)} ({len(admitted) / LOAD_S:.0f}/s): {dist(admitted)}")
    print(f"shed, queue full: {dist(full)}")
    print(f"shed, waited out: {dist(timed_out)}")
    print(f"slowest answer {worst * 1000:.1f} ms")

    assert {a.status for a in answers} <= {201, 503}, {a.status for a in answers}
    assert all(a.code == "overloaded" and a.retry_after for a in shed), shed[:3]
    assert len(admitted) >= 0.5 * capacity * LOAD_S  # the slots kept working
    assert len(shed) >= 0.5 * len(answers)  # and the excess was shed, not queued
    # Admitted: at most the queue wait plus the claim's own round trip (and slack).
    assert pct(admitted, 99) < QUEUE_WAIT_S + 2 * rtt + MARGIN_S
    # Nothing waits past its deadline: no answer later than the wait plus one round trip.
    assert worst < QUEUE_WAIT_S + rtt + MARGIN_S
    # A waiter shed on its deadline is answered then, not after a Redis call.
    assert max(timed_out, default=0) < QUEUE_WAIT_S + MARGIN_S
    # A full queue answers at once (the client's own scheduling is in these figures).
    assert full and pct(full, 99) < SHED_FAST_S

    # Once the load stops the worker is itself again, and only the 201s took stock.
    after = await post(client, url, gw.token("after"))
    assert after.status == 201 and after.seconds < rtt + MARGIN_S, after
    async with client.get(f"{gw.base}/v1/campaigns/{cid}", headers=gw.admin_headers) as r:
        doc = await r.json()
    assert doc["claimed"] == len(warm) + len(admitted) + 1, doc
