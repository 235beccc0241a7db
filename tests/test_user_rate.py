"""One user hammering at 200 requests/s whom Redis keeps refusing: the worker-local per-user
rate (GCRA) lets at most the configured rate through to Redis (counted in INFO
commandstats); the rest get `429` with Retry-After and RateLimit fields. (A user refused
for their own per-user limit is answered from memory instead: tests/test_claims_concurrency.)"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import claim, create_campaign
from tests.servers import Gateway, RedisServer

RATE, BURST, WORKERS = 5.0, 10, 2
POLICY = re.compile(r'^"per-user";q=\d+;w=\d+$')
RATELIMIT = re.compile(r'^"per-user";r=\d+;t=\d+$')


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[RedisServer, Gateway]]:
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    gw = Gateway(redis.url, tmp_path / "gw", workers=WORKERS,
                 user_rate_per_s=str(RATE), user_burst=str(BURST))
    try:
        gw.start()
        yield redis, gw
    finally:
        gw.stop()
        redis.stop()


def evalsha_calls(redis: RedisServer) -> int:
    c = redis.client()
    try:
        stats = c.info("commandstats")
        return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))
    finally:
        c.close()


async def test_one_user_at_200_per_second(rig: tuple[RedisServer, Gateway]) -> None:
    redis, gw = rig
    async with aiohttp.ClientSession() as http:
        # one grant per address, and it is taken: Redis refuses the hammer every time
        c = await create_campaign(http, gw, stock=100, limits={"per_ip": 1})
        first, _, _ = await claim(http, gw, c["id"], gw.token("first"))
        assert first == 201
        token = gw.token("hammer")
        before = evalsha_calls(redis)
        started = time.monotonic()
        answers = []
        for i in range(600):  # 200/s for 3 s, on a steady clock
            await asyncio.sleep(max(0.0, started + i / 200 - time.monotonic()))
            answers.append(await claim(http, gw, c["id"], token))
        elapsed = time.monotonic() - started
        reached = evalsha_calls(redis) - before

    statuses = Counter(a[0] for a in answers)
    assert set(statuses) == {409, 429}, statuses
    assert {b["limit"] for st, b, _ in answers if st == 409} == {"ip"}
    allowed = WORKERS * (BURST + RATE * elapsed)  # each worker keeps its own bucket
    assert reached <= allowed, (reached, allowed)
    assert statuses[409] == reached, (statuses, reached)
    assert statuses[429] >= 600 - allowed
    for status, body, headers in answers:
        if status == 429:
            assert body["code"] == "rate_limited"
            assert int(headers["Retry-After"]) >= 1
            assert POLICY.match(headers["RateLimit-Policy"]), headers["RateLimit-Policy"]
            assert RATELIMIT.match(headers["RateLimit"]), headers["RateLimit"]
