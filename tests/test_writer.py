"""The writer drains claim streams into SQLite/PostgreSQL through kills, poison and company."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis

from gateway.redis.keys import CampaignKeys
from tests.conftest import create_campaign
from tests.servers import Gateway, RedisServer, Writer, private_stack

GROUP = "writer"
CONCURRENCY = 256
DRAIN_S = 90.0


@dataclass
class Stack:
    redis: RedisServer
    gw: Gateway
    store_url: str
    r: aioredis.Redis
    http: aiohttp.ClientSession
    writers: list[Writer] = field(default_factory=list)

    def writer(self, **env: str) -> Writer:
        w = Writer(self.gw, self.store_url, **env)
        self.writers.append(w)
        return w

    async def campaign(self, stock: int) -> str:
        return str((await create_campaign(self.http, self.gw, stock=stock))["id"])

    async def meta(self, cid: str) -> dict[str, str]:
        meta: Any = await self.r.hgetall(CampaignKeys.of(cid).meta)
        return dict(meta)

    async def pending(self, cid: str) -> int:
        summary: Any = await self.r.xpending(CampaignKeys.of(cid).events, GROUP)
        return int(summary["pending"])

    async def sql(self, query: str, *args: object) -> list[tuple[Any, ...]]:
        """Read or change the store directly (PostgreSQL placeholders: $1, ...)."""
        if self.store_url.startswith("sqlite"):
            path = self.store_url.removeprefix("sqlite:///")
            with sqlite3.connect(path) as db:
                cur = db.execute(query.replace("$1", "?"), args)
                return [tuple(r) for r in cur.fetchall()]
        conn = await asyncpg.connect(self.store_url)
        try:
            return [tuple(r) for r in await conn.fetch(query, *args)]
        finally:
            await conn.close()

    async def stored(self, cid: str) -> tuple[int, int, int, int]:
        """Rows, distinct claim ids, distinct seqs, distinct (user, n) of one campaign."""
        q = ("SELECT count(*), count(DISTINCT claim_id), count(DISTINCT seq), "
             "count(DISTINCT user_id || '/' || n) FROM claims WHERE campaign_id = $1")
        try:
            got = await self.sql(q, cid)
        except (sqlite3.OperationalError, asyncpg.UndefinedTableError):
            return 0, 0, 0, 0  # the writer has not migrated yet
        return tuple(int(x) for x in got[0])  # type: ignore[return-value]

    async def reconcile(self, cid: str, *flags: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.cli", "reconcile", "--campaign", cid, *flags,
            env={**self.gw.env, "FLASHCLAIM_STORE_URL": self.store_url},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return proc.returncode, out.decode()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[RedisServer, Gateway]]:
    """A Redis and 2-worker gateway of this test's own: writers drain every campaign in it."""
    with private_stack(tmp_path / "redis", tmp_path / "gateway") as stack:
        yield stack


@pytest.fixture
async def stack(
    servers: tuple[RedisServer, Gateway], store_url: str
) -> AsyncIterator[Stack]:
    rs, gw = servers
    r = aioredis.Redis(port=rs.port, decode_responses=True)
    conn = aiohttp.TCPConnector(limit=CONCURRENCY)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as http:
        st = Stack(rs, gw, store_url, r, http)
        try:
            yield st
        finally:
            for w in st.writers:
                await asyncio.to_thread(w.kill)
    await r.aclose()


@dataclass
class Load:
    """Claims from distinct users, retried on 503 with an Idempotency-Key, so a lost reply
    never hides a grant; `granted` maps user -> the claim id its 201 carried."""

    granted: dict[str, str] = field(default_factory=dict)
    others: list[tuple[int, Any]] = field(default_factory=list)
    retries: int = 0


async def drive(st: Stack, cid: str, users: list[str], load: Load | None = None) -> Load:
    load = load or Load()
    url = f"{st.gw.base}/v1/campaigns/{cid}/claims"
    sem = asyncio.Semaphore(CONCURRENCY)

    async def one(user: str) -> None:
        headers = {"Authorization": f"Bearer {st.gw.token(user)}", "Idempotency-Key": user}
        async with sem:
            for _ in range(200):
                try:
                    async with st.http.post(url, headers=headers) as r:
                        body = await r.json(content_type=None)
                        status = r.status
                except (aiohttp.ClientError, TimeoutError):
                    status, body = 0, None
                if status == 201:
                    assert user not in load.granted, (user, body)
                    load.granted[user] = body["claim_id"]
                    return
                if status not in (0, 503):
                    load.others.append((status, body))
                    return
                load.retries += 1
                await asyncio.sleep(0.05)  # client back-off before a retry
            load.others.append((-1, f"{user}: no answer after 200 tries"))

    await asyncio.gather(*(one(u) for u in users))
    return load


async def eventually(what: str, check: Callable[[], Awaitable[bool]],
                     timeout_s: float = DRAIN_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


async def drained(st: Stack, cid: str, grants: int, timeout_s: float = DRAIN_S) -> None:
    async def done() -> bool:
        meta = await st.meta(cid)
        return (int(meta.get("unwritten", 0)) <= 0 and await st.pending(cid) == 0
                and (await st.stored(cid))[0] >= grants)

    await eventually(f"the writer to store {grants} claims of {cid}", done, timeout_s)


async def exited(w: Writer, timeout_s: float) -> int:
    assert w.proc is not None
    proc = w.proc

    async def gone() -> bool:
        return proc.poll() is not None

    await eventually("the writer to exit", gone, timeout_s)
    assert proc.returncode is not None
    return proc.returncode


async def committed_not_acked(st: Stack, cid: str, consumer: str) -> None:
    """The crashed consumer's entries are still pending, and yet in the store."""
    pending: Any = await st.r.xpending_range(
        CampaignKeys.of(cid).events, GROUP, "-", "+", 10_000, consumername=consumer)
    ids = {str(p["message_id"]) for p in pending}
    assert ids, "the writer crashed before reading anything"
    stored = {str(r[0]) for r in await st.sql(
        "SELECT stream_id FROM claims WHERE campaign_id = $1", cid)}
    assert ids & stored, "the crashed batch was not committed"


async def assert_all_stored(st: Stack, cid: str, load: Load) -> None:
    meta = await st.meta(cid)
    grants = int(meta["seq"])
    assert grants == len(load.granted), (grants, len(load.granted))
    rows, ids, seqs, user_ns = await st.stored(cid)
    assert (rows, ids, seqs, user_ns) == (grants,) * 4, "rows != grants or duplicates"
    stored = {str(r[0]) for r in await st.sql(
        "SELECT claim_id FROM claims WHERE campaign_id = $1", cid)}
    missing = set(load.granted.values()) - stored
    assert not missing, f"{len(missing)} granted claims are not in the store"
    assert await st.pending(cid) == 0
    assert int(meta.get("unwritten", 0)) == 0, meta.get("unwritten")


async def test_kills_lose_nothing_and_store_nothing_twice(stack: Stack) -> None:
    st, n = stack, 20_000
    cid = await st.campaign(n)
    users = [f"u{i:05d}" for i in range(n)]
    load = Load()
    w = st.writer()
    w.start()
    traffic = asyncio.create_task(drive(st, cid, users, load))

    async def past(fraction: float) -> None:
        async def reached() -> bool:
            return len(load.granted) >= fraction * n or traffic.done()
        await eventually(f"{fraction:.0%} of the grants", reached, 200)

    await past(random.uniform(0.1, 0.3))
    await asyncio.to_thread(w.kill)  # 1: SIGKILL at a random moment
    w.start(fault="writer_crash_after_commit", writer_name="crashed")  # 2: commit, no ack
    assert await exited(w, 30) == 137
    await committed_not_acked(st, cid, "crashed")
    w.start()
    await past(random.uniform(0.5, 0.8))
    await asyncio.to_thread(w.kill)  # 3: SIGKILL again
    w.start()
    await traffic
    assert not load.others, load.others[:5]
    assert len(load.granted) == n
    await drained(st, cid, n)
    await asyncio.to_thread(w.stop)
    await assert_all_stored(st, cid, load)

    code, out = await st.reconcile(cid)
    assert code == 0, out
    victim = sorted(load.granted.values())[n // 2]
    await st.sql("DELETE FROM claims WHERE claim_id = $1", victim)
    code, out = await st.reconcile(cid)
    assert code == 1, out
    code, out = await st.reconcile(cid, "--repair")
    assert code == 0, out
    assert (await st.stored(cid))[:2] == (n, n)
    assert await st.sql("SELECT seq FROM claims WHERE claim_id = $1", victim) == [
        (int(victim.rsplit(".", 1)[1]),)]


POISON = [
    {"v": "1", "claim_id": "broken"},  # fields missing
    {"v": "99", "claim_id": "{cid}.9999", "campaign_id": "{cid}", "user_id": "z", "n": "1",
     "seq": "9999", "granted_at": "1767225600000"},  # a version this writer does not know
]


async def poison_run(st: Stack) -> tuple[str, Load, list[str]]:
    """Real grants with malformed entries XADDed between them; returns the poison ids."""
    cid = await st.campaign(400)
    w = st.writer(writer_max_deliveries="3")
    w.start()
    load = await drive(st, cid, [f"a{i}" for i in range(150)])
    events = CampaignKeys.of(cid).events
    bad = [str(await st.r.xadd(events, {k: v.format(cid=cid) for k, v in p.items()}))
           for p in POISON]
    await drive(st, cid, [f"b{i}" for i in range(150)], load)
    assert not load.others, load.others[:5]
    dead = CampaignKeys.of(cid).dead

    async def dead_lettered() -> bool:
        return int(await st.r.xlen(dead)) == len(bad)

    await eventually("the poison to be dead-lettered", dead_lettered, 30)
    await drained(st, cid, 300)
    await asyncio.to_thread(w.stop)
    return cid, load, bad


async def test_poison_goes_to_dead_letters(stack: Stack) -> None:
    st = stack
    cid, load, bad = await poison_run(st)
    entries: Any = await st.r.xrange(CampaignKeys.of(cid).dead)
    assert sorted(f["dead_entry_id"] for _, f in entries) == sorted(bad)
    for _, f in entries:
        assert f["dead_reason"], f
    assert entries[0][1]["claim_id"] == "broken"  # the entry's own fields are kept
    assert await st.pending(cid) == 0  # acked
    rows, ids, _, _ = await st.stored(cid)
    assert rows == ids == 300
    stored = {str(r[0]) for r in await st.sql(
        "SELECT claim_id FROM claims WHERE campaign_id = $1", cid)}
    assert set(load.granted.values()) <= stored


async def test_poison_leaves_backlog_and_reconcile_right(stack: Stack) -> None:
    """A dead-lettered entry that no grant counted must not lower the unwritten backlog, and
    reconcile (with or without --repair) still agrees with a stream that holds poison."""
    st = stack
    cid, load, _ = await poison_run(st)
    assert int((await st.meta(cid))["unwritten"]) == 0
    code, out = await st.reconcile(cid)
    assert code == 0, out
    code, out = await st.reconcile(cid, "--repair")
    assert code == 0, out
    assert (await st.stored(cid))[0] == len(load.granted) == 300


async def test_two_writers_store_each_grant_once(stack: Stack) -> None:
    st, n = stack, 4000
    cid = await st.campaign(n)
    writers = [st.writer(writer_name="w-a"), st.writer(writer_name="w-b")]
    for w in writers:
        w.start()
    load = await drive(st, cid, [f"u{i}" for i in range(n)])
    assert not load.others, load.others[:5]
    await drained(st, cid, n)
    for w in writers:
        await asyncio.to_thread(w.stop)
    await assert_all_stored(st, cid, load)
    consumers: Any = await st.r.xinfo_consumers(CampaignKeys.of(cid).events, GROUP)
    assert {c["name"] for c in consumers} >= {"w-a", "w-b"}


async def test_sigterm_exits_cleanly(stack: Stack) -> None:
    st = stack
    cid = await st.campaign(500)
    w = st.writer()
    w.start()
    traffic = asyncio.create_task(drive(st, cid, [f"u{i}" for i in range(500)]))

    async def writing() -> bool:
        return (await st.stored(cid))[0] > 0

    await eventually("the writer to store something", writing, 30)
    assert w.proc is not None
    t0 = time.monotonic()
    w.proc.terminate()
    assert await exited(w, 5) == 0
    assert time.monotonic() - t0 < 5
    load = await traffic
    w.start()  # what it left is picked up by the next one
    await drained(st, cid, 500)
    await asyncio.to_thread(w.stop)
    await assert_all_stored(st, cid, load)


async def test_a_dead_consumers_single_entry_is_reclaimed(stack: Stack) -> None:
    """One entry left pending by a consumer that died is taken over and stored."""
    st = stack
    cid = await st.campaign(50)
    load = await drive(st, cid, ["first"])
    events = CampaignKeys.of(cid).events
    await st.r.xgroup_create(events, GROUP, id="0")
    got: Any = await st.r.xreadgroup(GROUP, "ghost", {events: ">"}, count=10)
    assert len(got[0][1]) == 1  # delivered to "ghost", which never acks

    async def idle() -> bool:
        info: Any = await st.r.xpending_range(events, GROUP, "-", "+", 1)
        return int(info[0]["time_since_delivered"]) > 1500

    await eventually("the entry to be idle past writer_claim_idle_ms", idle, 10)
    w = st.writer()
    w.start()
    await drive(st, cid, [f"u{i}" for i in range(20)], load)
    await drained(st, cid, 21, timeout_s=30)
    await asyncio.to_thread(w.stop)
    await assert_all_stored(st, cid, load)
