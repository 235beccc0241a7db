"""Claims under concurrency on two workers: exact stock, identity limits, restock."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import aiohttp
import pytest

from gateway.redis.keys import CampaignKeys
from tests.conftest import claim, create_campaign
from tests.servers import Gateway, RedisServer

TIMEOUT = aiohttp.ClientTimeout(total=120)


@dataclass(frozen=True)
class Answer:
    user: str
    status: int
    body: dict[str, Any]
    headers: Mapping[str, str]

    @property
    def worker(self) -> str:
        return worker_of(self.headers)


def worker_of(headers: Mapping[str, str]) -> str:
    """Which worker answered: its request ids start with its pid (hex)."""
    return headers["X-Request-Id"].split("-", 1)[0]


async def volley(
    gw: Gateway, cid: str, calls: list[tuple[str, str]], *, fresh: bool = False
) -> tuple[list[Answer], int]:
    """Fire every (user, token) claim at once; the answers and the peak number in flight.
    `fresh` opens a new connection per request, so the kernel spreads them over workers."""
    inflight = peak = 0

    async def sent(*_: object) -> None:
        nonlocal inflight, peak
        inflight += 1
        peak = max(peak, inflight)

    async def done(*_: object) -> None:
        nonlocal inflight
        inflight -= 1

    trace = aiohttp.TraceConfig()
    trace.on_request_headers_sent.append(sent)
    trace.on_request_end.append(done)
    trace.on_request_exception.append(done)
    conn = aiohttp.TCPConnector(limit=64 if fresh else 512, force_close=fresh)
    async with aiohttp.ClientSession(connector=conn, trace_configs=[trace], timeout=TIMEOUT) as s:

        async def one(user: str, token: str) -> Answer:
            status, body, headers = await claim(s, gw, cid, token)
            return Answer(user, status, body, headers)

        answers = await asyncio.gather(*(one(u, t) for u, t in calls))
    return list(answers), peak


def check_answers(cid: str, answers: list[Answer]) -> dict[str, list[str]]:
    """Every answer is a valid outcome; returns each user's granted claim ids in seq order.
    One user's concurrent repeat clicks may share one grant (single-flight): several `201`s
    naming the same claim are one grant."""
    grants: dict[str, set[tuple[int, str]]] = defaultdict(set)
    for a in answers:
        if a.status == 201:
            seq = a.body["seq"]
            assert a.body["user_id"] == a.user, a.body
            assert a.body["campaign_id"] == cid
            assert a.body["claim_id"] == f"{cid}.{seq}"
            grants[a.user].add((seq, a.body["claim_id"]))
        elif a.status == 409:
            assert a.body["code"] == "limit_reached", a.body
        elif a.status == 410:
            assert a.body["code"] == "sold_out", a.body
        elif a.status in (429, 503):
            assert "Retry-After" in a.headers, (a.status, a.body)
        else:
            pytest.fail(f"unexpected answer {a.status}: {a.body}")
    seqs = [seq for items in grants.values() for seq, _ in items]
    assert len(seqs) == len(set(seqs)), "a sequence number was handed out twice"
    mine = {u: [c for _, c in sorted(items)] for u, items in grants.items()}
    for a in answers:
        if a.status == 409:
            assert sorted(a.body["claims"]) == sorted(mine.get(a.user, [])), a.body
    return mine


Events = list[dict[str, str]]


def redis_state(redis_server: RedisServer, cid: str) -> tuple[dict[str, str], int, Events]:
    """The campaign's meta hash, its claim stream's XLEN and entries, straight from Redis."""
    keys = CampaignKeys.of(cid)
    r = redis_server.client()
    try:
        meta = cast(dict[str, str], r.hgetall(keys.meta))
        length = r.xlen(keys.events)
        entries = cast(list[tuple[str, dict[str, str]]], r.xrange(keys.events))
        return meta, length, [fields for _, fields in entries]
    finally:
        r.close()


# Users that share a device or phone are neighbours, and each user's three clicks are sent
# back to back: the arrival order most likely to slip past a broken limit.
Identities = Callable[[int], dict[str, str]]
CASES: dict[str, tuple[dict[str, int], Identities, str]] = {
    "per_user": ({"per_user": 1}, lambda i: {}, "user_id"),
    "per_device": ({"per_user": 5, "per_device": 1}, lambda i: {"dev": f"dev-{i // 4}"}, "device"),
    "per_phone": (
        {"per_user": 5, "per_phone": 1},
        lambda i: {"phone": f"+86138{i // 4:08d}"},
        "phone",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_exact_stock_and_identity_limit_under_load(
    case: str, gateway: Gateway, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    limits, identity, unit_field = CASES[case]
    c = await create_campaign(http, gateway, stock=100, limits=limits)
    cid = c["id"]
    users = [f"{case}-u{i}" for i in range(600)]
    tokens = {u: gateway.token(u, **identity(i)) for i, u in enumerate(users)}
    unit = {u: identity(i).get("dev") or identity(i).get("phone") or u for i, u in enumerate(users)}
    calls = [(u, tokens[u]) for u in users for _ in range(3)]

    answers, peak = await volley(gateway, cid, calls)

    assert len(answers) == 1800
    assert peak >= 200, f"only {peak} claims were in flight at once"
    mine = check_answers(cid, answers)
    assert sum(a.status == 201 for a in answers) == 100
    assert all(len(ids) == 1 for ids in mine.values()), "a user was granted twice"
    assert len({unit[u] for u in mine}) == 100, f"a {case} identity was granted twice"

    meta, length, events = redis_state(redis_server, cid)
    assert (meta["remaining"], meta["seq"], length) == ("0", "100", 100)
    assert {e["user_id"] for e in events} == set(mine)
    assert {e["claim_id"] for e in events} == {ids[0] for ids in mine.values()}
    assert len({e[unit_field] for e in events}) == 100
    async with http.get(f"{gateway.base}/v1/campaigns/{cid}", headers=gateway.admin_headers) as r:
        view = await r.json()
    assert (view["stock"], view["remaining"], view["claimed"]) == (100, 0, 100)


async def test_one_user_many_concurrent_clicks_get_exactly_the_limit(
    gateway: Gateway, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    c = await create_campaign(http, gateway, stock=100, limits={"per_user": 2})
    token = gateway.token("eager")
    answers, _ = await volley(gateway, c["id"], [("eager", token)] * 10, fresh=True)

    mine = check_answers(c["id"], answers)
    assert sorted(a.status for a in answers) == [201] * 2 + [409] * 8
    assert len(mine["eager"]) == 2
    for a in answers:
        if a.status == 409:
            assert a.body["claims"] == mine["eager"]
    meta, length, events = redis_state(redis_server, c["id"])
    assert (meta["remaining"], meta["seq"], length) == ("98", "2", 2)
    assert [e["user_id"] for e in events] == ["eager", "eager"]


async def test_limit_reached_lists_the_callers_claims(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    c = await create_campaign(http, gateway, stock=10, limits={"per_user": 1})
    token = gateway.token("winner")
    status, grant, _ = await claim(http, gateway, c["id"], token)
    assert status == 201, grant
    status, body, headers = await claim(http, gateway, c["id"], token)
    assert status == 409
    assert headers["Content-Type"].startswith("application/problem+json")
    assert body["code"] == "limit_reached"
    assert body["claims"] == [grant["claim_id"]]


@contextlib.asynccontextmanager
async def pinned_sessions(gw: Gateway) -> AsyncIterator[dict[str, aiohttp.ClientSession]]:
    """One single-connection keep-alive session per worker, keyed by worker."""
    sessions: dict[str, aiohttp.ClientSession] = {}
    spare: list[aiohttp.ClientSession] = []
    deadline = time.monotonic() + 10
    try:
        while len(sessions) < gw.workers:
            assert time.monotonic() < deadline, f"reached only workers {list(sessions)}"
            s = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1), timeout=TIMEOUT)
            async with s.get(gw.base + "/healthz") as r:
                await r.read()
                w = worker_of(r.headers)
            if w in sessions:
                spare.append(s)
            else:
                sessions[w] = s
        yield sessions
    finally:
        for s in [*sessions.values(), *spare]:
            await s.close()


async def claim_on(
    gw: Gateway, sessions: Mapping[str, aiohttp.ClientSession], cid: str, prefix: str
) -> dict[str, Answer]:
    """One claim by a new user on each worker, in turn."""
    out = {}
    for w, s in sessions.items():
        user = f"{prefix}-{w}"
        status, body, headers = await claim(s, gw, cid, gw.token(user))
        out[w] = Answer(user, status, body, headers)
        assert out[w].worker == w, "the pinned connection moved to another worker"
    return out


async def all_workers_sold_out(
    gw: Gateway, sessions: Mapping[str, aiohttp.ClientSession], cid: str, prefix: str
) -> None:
    on_each = await claim_on(gw, sessions, cid, prefix + "-pinned")
    assert {w: (a.status, a.body["code"]) for w, a in on_each.items()} == {
        w: (410, "sold_out") for w in sessions
    }
    calls = [(f"{prefix}-{i}", gw.token(f"{prefix}-{i}")) for i in range(60)]
    answers, _ = await volley(gw, cid, calls, fresh=True)
    assert {(a.status, a.body["code"]) for a in answers} == {(410, "sold_out")}
    assert {a.worker for a in answers} == set(sessions), "fresh connections missed a worker"


async def wait_reopened(
    gw: Gateway, sessions: Mapping[str, aiohttp.ClientSession], cid: str
) -> None:
    """Each worker stops answering sold out within 100 ms of the restock's reply: an anonymous
    claim changes nothing, and a worker still holding the sold-out flag says so before it
    asks for a token."""
    deadline = time.monotonic() + 0.1
    for w, s in sessions.items():
        while True:
            async with s.post(f"{gw.base}/v1/campaigns/{cid}/claims") as r:
                await r.read()
            if r.status != 410:
                assert r.status == 401
                break
            assert time.monotonic() < deadline, f"worker {w} still sold out 100 ms after restock"
            await asyncio.sleep(0.005)


async def test_restock_reopens_every_worker_then_sells_out_again(
    gateway: Gateway, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    c = await create_campaign(http, gateway, stock=30)
    cid = c["id"]
    first = [(f"r-u{i}", gateway.token(f"r-u{i}")) for i in range(90)]
    answers, _ = await volley(gateway, cid, first)
    assert sum(len(ids) for ids in check_answers(cid, answers).values()) == 30

    async with pinned_sessions(gateway) as sessions:
        await all_workers_sold_out(gateway, sessions, cid, "before")

        async with http.post(
            f"{gateway.base}/v1/campaigns/{cid}/restock",
            json={"quantity": 10},
            headers=gateway.admin_headers,
        ) as r:
            view = await r.json()
            assert r.status == 200, view
        assert (view["stock"], view["remaining"]) == (40, 10)

        await wait_reopened(gateway, sessions, cid)
        reopened = await claim_on(gateway, sessions, cid, "reopened")
        assert {w: a.status for w, a in reopened.items()} == {w: 201 for w in sessions}

        late = [(f"late-{i}", gateway.token(f"late-{i}")) for i in range(60)]
        answers, _ = await volley(gateway, cid, late)
        mine = check_answers(cid, answers + list(reopened.values()))
        assert sum(len(ids) for ids in mine.values()) == 10

        await all_workers_sold_out(gateway, sessions, cid, "after")

    meta, length, events = redis_state(redis_server, cid)
    assert (meta["remaining"], meta["seq"], meta["total"], length) == ("0", "40", "40", 40)
    assert Counter(e["user_id"] for e in events).most_common(1)[0][1] == 1
    assert {e["user_id"] for e in events[30:]} == set(mine)


async def test_a_winner_asking_again_once_sold_out_hears_limit_reached(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    """An authenticated caller's limit outranks sold out where the worker knows it: the
    worker that granted a user, and verified their token, names the claim; another worker
    answers the campaign-wide sold out."""
    c = await create_campaign(http, gateway, stock=gateway.workers)
    cid = c["id"]
    async with pinned_sessions(gateway) as sessions:
        tokens = {w: gateway.token(f"winner-{w}") for w in sessions}
        grants = {}
        for w, s in sessions.items():
            status, body, headers = await claim(s, gateway, cid, tokens[w])
            assert (status, worker_of(headers)) == (201, w), body
            grants[w] = body["claim_id"]
        deadline = time.monotonic() + 2
        while True:  # every worker learns of the sell-out (a verdict, or the pub/sub news)
            strangers = await claim_on(gateway, sessions, cid, f"late-{time.monotonic()}")
            if all(a.status == 410 for a in strangers.values()):
                break
            assert time.monotonic() < deadline, strangers
            await asyncio.sleep(0.05)
        workers = list(sessions)
        for w, s in sessions.items():
            status, body, _ = await claim(s, gateway, cid, tokens[w])
            assert (status, body["code"], body["limit"], body["claims"]) == (
                409, "limit_reached", "user", [grants[w]]), body
            other = tokens[workers[(workers.index(w) + 1) % len(workers)]]
            status, body, _ = await claim(s, gateway, cid, other)
            assert (status, body["code"]) == (410, "sold_out"), body
        # a blocklist outranks the limit (403 before 409) for a caller the worker knows
        w, s = next(iter(sessions.items()))
        url, value = f"{gateway.base}/v1/blocks/user", {"value": f"winner-{w}"}
        async with http.post(url, json=value, headers=gateway.admin_headers) as r:
            assert r.status in (200, 201), await r.text()
        try:
            deadline = time.monotonic() + 3
            while True:  # every worker's copy of the lists follows within a moment
                status, body, _ = await claim(s, gateway, cid, tokens[w])
                if status == 403:
                    break
                assert (status, time.monotonic() < deadline) == (409, True), body
                await asyncio.sleep(0.05)
            assert body["code"] == "blocked", body
        finally:
            async with http.delete(url, params=value, headers=gateway.admin_headers) as r:
                assert r.status in (200, 204), await r.text()


async def test_a_winners_repeat_clicks_hear_their_claim_not_too_fast_and_skip_redis(
    gateway: Gateway, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    """DESIGN: the identity limit (409) outranks admission (429). Once a worker has granted
    a user their limit, their repeat clicks there are answered from memory: `limit_reached`
    naming the claim, past the per-user request rate, with no Redis call; a retry with an
    Idempotency-Key still goes to Redis and replays the grant."""
    c = await create_campaign(http, gateway, stock=100)
    cid = c["id"]
    async with pinned_sessions(gateway) as sessions:
        s = next(iter(sessions.values()))
        token = gateway.token("clicker")
        status, grant, _ = await claim(s, gateway, cid, token,
                                       headers={"Idempotency-Key": "click-1"})
        assert status == 201, grant
        r = redis_server.client()
        try:
            calls = int(r.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))
            answers = [await claim(s, gateway, cid, token) for _ in range(30)]  # burst is 10
            after = int(r.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))
        finally:
            r.close()
        assert {(st, b["code"]) for st, b, _ in answers} == {(409, "limit_reached")}
        assert all(b["claims"] == [grant["claim_id"]] for _, b, _ in answers)
        assert after == calls, "repeat clicks of a known winner went to Redis"
        status, again, _ = await claim(s, gateway, cid, token,
                                       headers={"Idempotency-Key": "click-1"})
        assert (status, again["claim_id"]) == (201, grant["claim_id"]), again
