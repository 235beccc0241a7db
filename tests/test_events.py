"""Claim event subscribers: in-order replay from the start, live events, at-least-once on kill."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, cast

import aiohttp
import pytest
import redis.asyncio as aioredis

from gateway import events as claim_events
from gateway.events import ClaimEvent, Delivery
from gateway.redis.keys import CampaignKeys
from tests.conftest import claim, create_campaign
from tests.servers import Gateway, RedisServer, private_stack

N = 1000
WAIT_S = 30.0


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, Gateway]]:
    with private_stack(tmp_path_factory.mktemp("events-redis"),
                       tmp_path_factory.mktemp("events-gateway")) as stack:
        yield stack


@pytest.fixture
def gw(servers: tuple[RedisServer, Gateway]) -> Gateway:
    return servers[1]


@pytest.fixture
async def r(servers: tuple[RedisServer, Gateway]) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis(port=servers[0].port, decode_responses=True)
    yield client
    await client.aclose()


def subscribe(r: aioredis.Redis, cid: str, group: str,
              **kw: Any) -> AsyncGenerator[Delivery, None]:
    """gateway.events.subscribe, typed as the async generator it is (it has aclose)."""
    return cast(AsyncGenerator[Delivery, None], claim_events.subscribe(r, cid, group, **kw))


async def grant(http: aiohttp.ClientSession, gw: Gateway, cid: str, users: range) -> list[str]:
    """One claim per user; returns the granted claim ids in seq order."""
    sem = asyncio.Semaphore(128)

    async def one(i: int) -> tuple[int, str]:
        async with sem:
            status, body, _ = await claim(http, gw, cid, gw.token(f"u{i}"))
        assert status == 201, body
        return int(body["seq"]), str(body["claim_id"])

    return [c for _, c in sorted(await asyncio.gather(*(one(i) for i in users)))]


async def campaign_with_grants(http: aiohttp.ClientSession, gw: Gateway) -> tuple[str, list[str]]:
    cid = str((await create_campaign(http, gw, stock=N + 100))["id"])
    return cid, await grant(http, gw, cid, range(N))


async def take(stream: AsyncIterator[Delivery], count: int, *, ack: bool = True,
               handle: Callable[[ClaimEvent], Awaitable[None]] | None = None,
               ) -> list[ClaimEvent]:
    """The next `count` events; each is handled (when `handle` is given), then acked."""
    got: list[ClaimEvent] = []

    async def go() -> None:
        async for d in stream:
            got.append(d.event)
            if handle is not None:
                await handle(d.event)
            if ack:
                await d.ack()
            if len(got) == count:
                return

    try:
        await asyncio.wait_for(go(), WAIT_S)
    except TimeoutError:
        raise AssertionError(f"got {len(got)} of {count} events") from None
    return got


async def test_from_start_in_order_then_live(
    gw: Gateway, http: aiohttp.ClientSession, r: aioredis.Redis
) -> None:
    cid, ids = await campaign_with_grants(http, gw)
    async with contextlib.aclosing(subscribe(r, cid, "crm", from_start=True)) as stream:
        events = await take(stream, N)
        assert [e.seq for e in events] == list(range(1, N + 1))
        assert [e.claim_id for e in events] == ids
        assert {e.v for e in events} == {1} and {e.campaign_id for e in events} == {cid}
        assert {e.n for e in events} == {1}
        assert len({e.user_id for e in events}) == N
        assert all(e.granted_at > 0 for e in events)
        live = asyncio.create_task(take(stream, 50))
        more = await grant(http, gw, cid, range(N, N + 50))
        events = await live
    assert [e.seq for e in events] == list(range(N + 1, N + 51))
    assert [e.claim_id for e in events] == more


async def test_group_created_later_without_from_start_sees_only_new(
    gw: Gateway, http: aiohttp.ClientSession, r: aioredis.Redis
) -> None:
    cid, _ = await campaign_with_grants(http, gw)
    async with contextlib.aclosing(subscribe(r, cid, "late", block_ms=100)) as stream:
        first = asyncio.create_task(take(stream, 1))
        # the group is created by the first read; wait for it before granting more
        events_key = CampaignKeys.of(cid).events
        deadline = time.monotonic() + WAIT_S
        while not any(g["name"] == "late" for g in await r.xinfo_groups(events_key)):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        more = await grant(http, gw, cid, range(N, N + 1))
        assert [e.claim_id for e in await first] == more


async def test_cancelled_subscriber_resumes_where_it_acked(
    gw: Gateway, http: aiohttp.ClientSession, r: aioredis.Redis
) -> None:
    cid, ids = await campaign_with_grants(http, gw)
    half = N // 2
    handled: dict[str, int] = {}
    stuck = asyncio.Event()

    async def note(e: ClaimEvent) -> None:
        handled[e.claim_id] = e.seq
        if len(handled) == half + 120:  # a handler that hangs: the task gets killed here
            stuck.set()
            await asyncio.Event().wait()

    stream = subscribe(r, cid, "wallet", consumer="wallet-1", from_start=True)
    await take(stream, half, handle=note)  # each handled, then acked
    await take(stream, 1, ack=False)  # in hand when it dies: never handled nor acked
    task = asyncio.create_task(take(stream, N, handle=note))
    await asyncio.wait_for(stuck.wait(), WAIT_S)
    task.cancel()  # killed mid-way, in the middle of a batch
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await stream.aclose()
    async with contextlib.aclosing(
        subscribe(r, cid, "wallet", consumer="wallet-1", from_start=True)
    ) as again:
        first = await take(again, 2, handle=note)
        # what it held unacked comes first: the event it never handled, then the one it died on
        assert [e.seq for e in first] == [half + 1, half + 121]
        await take(again, N - len(handled), handle=note)
    assert sorted(handled, key=handled.__getitem__) == ids


async def test_restart_redelivers_more_than_one_batch_of_unacked(
    gw: Gateway, http: aiohttp.ClientSession, r: aioredis.Redis
) -> None:
    """A subscriber that held 250 events unacked (batch 100) gets all 250 again."""
    cid, ids = await campaign_with_grants(http, gw)
    async with contextlib.aclosing(
        subscribe(r, cid, "risk", consumer="risk-1", from_start=True, batch=100)
    ) as stream:
        held = await take(stream, 250, ack=False)
    assert [e.seq for e in held] == list(range(1, 251))
    async with contextlib.aclosing(
        subscribe(r, cid, "risk", consumer="risk-1", from_start=True, batch=100)
    ) as again:
        events = await take(again, N)
    assert [e.claim_id for e in events] == ids


async def tail(gw: Gateway, cid: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "tail", "--campaign", cid, *args,
        env=gw.env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


def parse(lines: list[bytes]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines if line.endswith(b"\n")]


async def read_lines(proc: asyncio.subprocess.Process, count: int | None) -> list[bytes]:
    """Up to `count` lines (all until EOF when None)."""
    assert proc.stdout is not None
    lines: list[bytes] = []
    while count is None or len(lines) < count:
        line = await asyncio.wait_for(proc.stdout.readline(), WAIT_S)
        if not line:
            break
        lines.append(line)
    return lines


async def test_tail_prints_json_lines(
    gw: Gateway, http: aiohttp.ClientSession
) -> None:
    cid, ids = await campaign_with_grants(http, gw)
    proc = await tail(gw, cid, "--from-start", "--count", "300")
    out, err = await asyncio.wait_for(proc.communicate(), WAIT_S)
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert len(lines) == 300
    docs = [json.loads(line) for line in lines]
    assert {d["v"] for d in docs} == {1}
    assert [d["claim_id"] for d in docs] == ids[:300]
    assert [d["seq"] for d in docs] == list(range(1, 301))
    assert set(ClaimEvent.__struct_fields__) <= set(docs[0])


async def test_tail_stays_up_while_idle(gw: Gateway, http: aiohttp.ClientSession) -> None:
    """Longer than the Redis client's 1 s timeout without events: tail keeps waiting."""
    cid = str((await create_campaign(http, gw, stock=10))["id"])
    ids = await grant(http, gw, cid, range(3))
    proc = await tail(gw, cid, "--from-start", "--count", "4")
    try:
        lines = await read_lines(proc, 3)
        assert [d["claim_id"] for d in parse(lines)] == ids
        assert proc.stdout is not None
        with contextlib.suppress(TimeoutError):  # nothing to print for 2.5 s
            line = await asyncio.wait_for(proc.stdout.readline(), 2.5)
            assert proc.stderr is not None
            what = f"printed {line!r}" if line else "exited"
            raise AssertionError(f"tail {what} while idle: {(await proc.stderr.read())[-400:]!r}")
        assert proc.returncode is None
        more = await grant(http, gw, cid, range(3, 4))
        assert [d["claim_id"] for d in parse(await read_lines(proc, 1))] == more
        assert await asyncio.wait_for(proc.wait(), WAIT_S) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


async def test_killed_tail_restarted_misses_nothing(
    gw: Gateway, http: aiohttp.ClientSession
) -> None:
    cid, ids = await campaign_with_grants(http, gw)
    who = ("--group", "audit", "--consumer", "audit-1")
    first = await tail(gw, cid, *who, "--from-start")
    lines = await read_lines(first, 150)
    assert first.stderr is not None
    assert len(lines) == 150, (await first.stderr.read()).decode()
    # the pipe fills up behind these lines, so tail is stuck mid-batch when killed
    first.kill()
    lines += await read_lines(first, None)
    assert await first.wait() == -9, (await first.stderr.read()).decode()
    seen = {d["claim_id"] for d in parse(lines)}
    assert 150 <= len(seen) < N
    second = await tail(gw, cid, *who)
    try:
        assert second.stdout is not None and second.stderr is not None
        while not seen >= set(ids):  # repeats of unacked ones are fine: dedupe by claim_id
            try:
                line = await asyncio.wait_for(second.stdout.readline(), WAIT_S)
            except TimeoutError:
                raise AssertionError(f"{len(set(ids) - seen)} events never came") from None
            assert line, (f"{len(set(ids) - seen)} events missing; tail exited: "
                          f"{(await second.stderr.read())[-600:].decode()}")
            seen.add(json.loads(line)["claim_id"])
    finally:
        with contextlib.suppress(ProcessLookupError):
            second.kill()
        await second.wait()
