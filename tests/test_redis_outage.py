"""Redis stopped or hung: quick 503 + Retry-After, never 500; recovery by itself, data kept."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import create_campaign
from tests.servers import Gateway, RedisServer, private_stack

FAST_S = 1.0  # every answer while Redis is down
HUNG_S = 1.5  # while Redis hangs: the 1 s Redis timeout plus scheduling slack
RECOVER_S = 8.0  # from Redis accepting connections to every worker answering again
ROUNDS = 8  # requests per check; each on a new connection, so both workers get some
SEQUENTIAL = 4  # claims one after another while Redis hangs (each may wait the timeout)
STOCK = 1000


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[RedisServer, Gateway]]:
    """A Redis and a 2-worker gateway of this test's own: it stops that Redis."""
    with private_stack(tmp_path / "redis", tmp_path / "gateway") as stack:
        yield stack


@pytest.fixture
async def fresh() -> AsyncIterator[aiohttp.ClientSession]:
    """A new connection per request, so SO_REUSEPORT spreads them over the workers."""
    conn = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=conn) as session:
        yield session


Answer = tuple[int, dict[str, Any], Any, float]


async def call(
    http: aiohttp.ClientSession, method: str, url: str, *,
    token: str | None = None, body: Any = None, headers: dict[str, str] | None = None,
) -> Answer:
    """Status, JSON body, headers and seconds taken."""
    headers = {**({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})}
    t0 = time.monotonic()
    async with http.request(method, url, json=body, headers=headers) as r:
        doc = await r.json(content_type=None)
        return r.status, doc, r.headers, time.monotonic() - t0


def assert_unavailable(answer: Answer, what: str, within_s: float = FAST_S) -> None:
    status, doc, headers, took = answer
    assert status == 503, f"{what}: {status} {doc}"
    assert headers.get("Content-Type", "").startswith("application/problem+json"), what
    assert doc["code"] == "unavailable", f"{what}: {doc}"
    raw = headers.get("Retry-After", "")
    assert raw.isdigit() and int(raw) >= 1, f"{what}: Retry-After {raw!r}"
    assert took < within_s, f"{what} took {took:.3f}s while Redis was down"


def worker_pids(gw: Gateway) -> set[int]:
    """The supervisor's child processes (Linux /proc)."""
    assert gw.proc is not None and gw.proc.poll() is None, "the gateway exited"
    pid = gw.proc.pid
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return {int(p) for p in text.split()}


async def open_campaign(http: aiohttp.ClientSession, gw: Gateway) -> tuple[str, dict[str, Any]]:
    """A campaign every worker has served, and the first grant of it (user `winner`)."""
    cid = (await create_campaign(http, gw, stock=STOCK))["id"]
    url = f"{gw.base}/v1/campaigns/{cid}/claims"
    status, first, _, _ = await call(http, "POST", url, token=gw.token("winner"), body={})
    assert status == 201, first
    for i in range(ROUNDS - 1):
        status, doc, _, _ = await call(http, "POST", url, token=gw.token(f"warm-{i}"))
        assert status == 201, doc
    return cid, first


async def recover(http: aiohttp.ClientSession, gw: Gateway, cid: str, since: float) -> int:
    """Poll until /readyz and new claims succeed many times in a row on new connections;
    every answer on the way is a 503, never a 500. Returns the grants made meanwhile."""
    url = f"{gw.base}/v1/campaigns/{cid}/claims"
    streak, n, granted = 0, 0, 0
    while streak < 4 * gw.workers:
        assert time.monotonic() - since < RECOVER_S, "the gateway did not recover"
        ready = await call(http, "GET", gw.base + "/readyz")
        n += 1
        status, doc, _, _ = await call(http, "POST", url, token=gw.token(f"back-{n}"))
        granted += status == 201
        if ready[0] == 200 and status == 201:
            streak += 1
            continue
        streak = 0  # the two requests may reach different workers, each on its own way back
        assert ready[0] in (200, 503), ready[1]
        assert status in (201, 503), doc
        await asyncio.sleep(0.05)
    return granted


async def assert_intact(
    http: aiohttp.ClientSession, gw: Gateway, cid: str, first: dict[str, Any], granted: int
) -> None:
    """What was granted before the outage is still there, and the numbers add up."""
    url = f"{gw.base}/v1/campaigns/{cid}"
    winner = gw.token("winner")
    status, doc, _, _ = await call(http, "GET", url + "/claims/mine", token=winner)
    assert status == 200, doc
    assert doc["claims"] == [first]
    status, doc, _, _ = await call(http, "POST", url + "/claims", token=winner, body={})
    assert (status, doc["code"]) == (409, "limit_reached"), doc
    assert doc["claims"] == [first["claim_id"]]
    status, info, _, _ = await call(http, "GET", url, token=gw.admin_token)
    assert status == 200, info
    assert (info["claimed"], info["remaining"]) == (granted, STOCK - granted)


async def test_redis_stopped_fails_fast_and_recovers(
    servers: tuple[RedisServer, Gateway], fresh: aiohttp.ClientSession
) -> None:
    redis, gw = servers
    base = gw.base
    cid, first = await open_campaign(fresh, gw)
    claims_url = f"{base}/v1/campaigns/{cid}/claims"
    winner = gw.token("winner")
    pids = worker_pids(gw)

    await asyncio.to_thread(redis.stop)

    for i in range(ROUNDS):
        answer = await call(fresh, "POST", claims_url, token=gw.token(f"down-{i}"), body={})
        assert_unavailable(answer, "claim")
    for _ in range(ROUNDS):
        assert_unavailable(await call(fresh, "GET", base + "/readyz"), "/readyz")
    for _ in range(2):
        mine = await call(fresh, "GET", claims_url + "/mine", token=winner)
        assert_unavailable(mine, "claims/mine")
        unseen = await call(fresh, "POST", f"{base}/v1/campaigns/never-made/claims",
                            token=winner)
        assert_unavailable(unseen, "claim on a campaign no worker has seen")
        for url in (f"{base}/v1/campaigns/{cid}", f"{base}/v1/campaigns"):
            answer = await call(fresh, "GET", url, token=gw.admin_token)
            assert_unavailable(answer, f"admin GET {url}")
    async with fresh.get(base + "/healthz") as r:
        assert r.status == 200, "the process itself is up"

    await asyncio.to_thread(redis.start)  # same port and dir: the AOF brings the data back
    granted = ROUNDS + await recover(fresh, gw, cid, time.monotonic())
    assert worker_pids(gw) == pids, "recovery must not need new worker processes"
    await assert_intact(fresh, gw, cid, first, granted)


async def test_redis_hung_fails_within_its_timeout_and_recovers(
    servers: tuple[RedisServer, Gateway], fresh: aiohttp.ClientSession
) -> None:
    """A Redis that accepts nothing but closes nothing (SIGSTOP): answers wait at most the
    Redis timeout (FLASHCLAIM_REDIS_TIMEOUT_S, 1 s by default), then 503. A claim sent just
    before the hang may still run when Redis resumes, so its 503 is ambiguous: a retry with
    the same Idempotency-Key must settle it with one grant, never two."""
    redis, gw = servers
    assert redis.proc is not None
    cid, first = await open_campaign(fresh, gw)
    claims_url = f"{gw.base}/v1/campaigns/{cid}/claims"
    pids = worker_pids(gw)
    hung = [f"hung-{i}" for i in range(SEQUENTIAL + 12)]
    key = {"Idempotency-Key": "outage-retry-1"}

    os.kill(redis.proc.pid, signal.SIGSTOP)
    try:
        for user in hung[:SEQUENTIAL]:
            answer = await call(fresh, "POST", claims_url, token=gw.token(user), headers=key)
            assert_unavailable(answer, "claim", within_s=HUNG_S)
        burst = await asyncio.gather(*(
            call(fresh, "POST", claims_url, token=gw.token(user), headers=key)
            for user in hung[SEQUENTIAL:]
        ))
        for answer in burst:
            assert_unavailable(answer, "claim in a burst", within_s=HUNG_S)
        for _ in range(2):
            answer = await call(fresh, "GET", gw.base + "/readyz")
            assert_unavailable(answer, "/readyz", within_s=HUNG_S)
    finally:
        os.kill(redis.proc.pid, signal.SIGCONT)
    resumed = time.monotonic()

    granted = ROUNDS + await recover(fresh, gw, cid, resumed)
    assert worker_pids(gw) == pids, "recovery must not need new worker processes"
    for user in hung:
        status, doc, _, _ = await call(fresh, "POST", claims_url, token=gw.token(user),
                                       headers=key)
        assert status == 201, (user, doc)
        status, mine, _, _ = await call(fresh, "GET", claims_url + "/mine",
                                        token=gw.token(user))
        assert status == 200, mine
        assert [c["claim_id"] for c in mine["claims"]] == [doc["claim_id"]], user
    await assert_intact(fresh, gw, cid, first, granted + len(hung))
