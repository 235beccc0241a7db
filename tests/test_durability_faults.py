"""Durability under faults: a store outage sheds claims at the backlog bound and drains by
itself afterwards; a SIGKILLed Redis (appendfsync always) loses no granted claim."""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.durable.store import Store, open_store
from gateway.redis.keys import CampaignKeys
from tests.conftest import create_campaign
from tests.proxy import TcpProxy
from tests.servers import Gateway, RedisServer, Writer

STOCK = 1_000_000  # never the limit here
RATE = 250.0  # claims per second, each from a new user
MAX_INFLIGHT = 128
BACKLOG_MAX = 2000
BATCH_SLACK = 2 * 256  # a claim batch already past the check: one per worker (MAX_BATCH)
RECOVER_S = 20.0  # from the fault's end to claims granted again
DRAIN_S = 30.0  # from the load's end to store == Redis


class FsyncRedis(RedisServer):
    """The private redis-server with a chosen appendfsync policy, and SIGKILL."""

    def __init__(self, workdir: Path, *, appendfsync: str = "always") -> None:
        super().__init__(workdir)
        self.appendfsync = appendfsync

    def start(self) -> None:
        args = [
            self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
            "--save", "", "--appendonly", "yes", "--appendfsync", self.appendfsync,
            "--enable-debug-command", "yes", "--logfile", str(self.dir / "redis.log"),
        ]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        c = self.client()
        try:
            while True:
                try:
                    if c.ping():
                        return
                except RedisError:
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start; see {self.dir}/redis.log")
                time.sleep(0.02)
        finally:
            c.close()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None


@dataclass(frozen=True)
class Answer:
    sent: float  # time.monotonic()
    done: float
    status: int  # 0: no HTTP answer at all
    code: str
    retry_after: str
    claim_id: str
    seq: int


class Load:
    """Claims of distinct users at a steady rate until `stop()`; keeps every answer."""

    def __init__(self, gw: Gateway, cid: str, rate: float) -> None:
        self.gw, self.rate = gw, rate
        self.url = f"{gw.base}/v1/campaigns/{cid}/claims"
        self.answers: list[Answer] = []
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    def since(self, t: float, status: int | None = None) -> list[Answer]:
        return [a for a in self.answers if a.sent >= t and status in (None, a.status)]

    async def _one(self, s: aiohttp.ClientSession, user: str) -> None:
        headers = {"Authorization": f"Bearer {self.gw.token(user)}"}
        sent = time.monotonic()
        try:
            async with s.post(self.url, json={}, headers=headers) as r:
                doc = await r.json(content_type=None)
                self.answers.append(Answer(
                    sent, time.monotonic(), r.status, str(doc.get("code", "")),
                    r.headers.get("Retry-After", ""), str(doc.get("claim_id", "")),
                    int(doc.get("seq", 0))))
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            self.answers.append(Answer(sent, time.monotonic(), 0, repr(e), "", "", 0))

    async def run(self) -> None:
        conn = aiohttp.TCPConnector(limit=MAX_INFLIGHT)
        timeout = aiohttp.ClientTimeout(total=15)
        async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:
            tasks: set[asyncio.Task[None]] = set()
            t0, n = time.monotonic(), 0
            while not self._stop.is_set():
                due = int((time.monotonic() - t0) * self.rate)
                n = max(n, due - int(self.rate / 5))  # fallen behind: skip, do not burst
                while n < due and len(tasks) < MAX_INFLIGHT:
                    task = asyncio.create_task(self._one(s, f"u{n}"))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    n += 1
                await asyncio.sleep(0.01)  # the load's pace, not a wait for a condition
            await asyncio.gather(*tasks)


async def until(pred: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> float:
    """Poll until `pred()` holds; the time it did."""
    deadline = time.monotonic() + timeout_s
    while not await pred():
        assert time.monotonic() < deadline, f"not within {timeout_s}s: {what}"
        await asyncio.sleep(0.05)
    return time.monotonic()


class Probe:
    """Reads a campaign's numbers from Redis (None while it is down) and the store."""

    def __init__(self, redis: RedisServer, store: Store, cid: str) -> None:
        self.client = Redis(port=redis.port, decode_responses=True, socket_timeout=2)
        self.store, self.cid = store, cid
        self.keys = CampaignKeys.of(cid)
        self.max_unwritten = 0

    async def meta(self) -> tuple[int, int] | None:
        """(seq, unwritten)"""
        try:
            seq, unwritten = await self.client.hmget(self.keys.meta, ["seq", "unwritten"])
        except (RedisError, OSError):
            return None
        self.max_unwritten = max(self.max_unwritten, int(unwritten or 0))
        return int(seq or 0), int(unwritten or 0)

    async def stored(self) -> int:
        """Rows of the campaign; 0 until the writer has created the schema."""
        try:
            return await self.store.claim_count(self.cid)
        except (asyncpg.UndefinedTableError, sqlite3.OperationalError):
            return 0

    async def watch(self) -> None:
        """Track the largest backlog seen, until cancelled."""
        while True:
            await self.meta()
            await asyncio.sleep(0.05)

    async def writing(self) -> bool:
        return await self.stored() >= 250

    async def drained(self) -> bool:
        m = await self.meta()
        return m is not None and m[1] == 0 and await self.stored() == m[0]

    async def dead_letters(self) -> int:
        return int(await self.client.xlen(self.keys.dead))


def reconcile(writer: Writer, store_url: str, cid: str) -> subprocess.CompletedProcess[str]:
    env = {**writer.env, "FLASHCLAIM_STORE_URL": store_url}
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "reconcile", "--campaign", cid],
        env=env, capture_output=True, text=True, timeout=60, check=False)


def assert_nothing_lost(load: Load, cid: str, seq: int, stored_ids: set[str]) -> None:
    """Every 201 the clients saw is in the store, each grant is there exactly once."""
    granted = [a for a in load.answers if a.status == 201]
    seqs = Counter(a.seq for a in granted)
    assert not [s for s, k in seqs.items() if k > 1], "a sequence number was granted twice"
    missing = {a.claim_id for a in granted} - stored_ids
    assert not missing, f"{len(missing)} granted claims are not in the store: {sorted(missing)[:5]}"
    assert stored_ids == {f"{cid}.{k}" for k in range(1, seq + 1)}, \
        f"store holds {len(stored_ids)} rows for {seq} grants"


def assert_statuses(load: Load, code_503: str) -> list[Answer]:
    """Only 201 and 503 `code_503` with Retry-After; returns the 503s."""
    statuses = Counter(a.status for a in load.answers)
    assert set(statuses) <= {201, 503}, f"unexpected answers {statuses}: " + str(
        [a for a in load.answers if a.status not in (201, 503)][:3])
    shed = [a for a in load.answers if a.status == 503]
    assert {a.code for a in shed} <= {code_503}, Counter(a.code for a in shed)
    bad = [a for a in shed if not (a.retry_after.isdigit() and int(a.retry_after) >= 1)]
    assert not bad, f"503 without a usable Retry-After: {bad[:3]}"
    return shed


@contextlib.asynccontextmanager
async def running(redis: RedisServer, gw: Gateway, writer: Writer) -> AsyncIterator[None]:
    """Start and stop off the event loop: the proxy the writer may talk through runs on it."""
    try:
        await asyncio.to_thread(redis.start)
        await asyncio.to_thread(gw.start)
        writer.start()
        yield
    finally:
        await asyncio.to_thread(writer.stop)
        await asyncio.to_thread(gw.stop)
        await asyncio.to_thread(redis.stop)


async def start_load(
    stack: contextlib.AsyncExitStack, gw: Gateway, probe: Probe, cid: str
) -> Load:
    """Start the load and wait until the writer is storing its claims."""
    load = Load(gw, cid, RATE)
    loading = asyncio.create_task(load.run())

    async def stop() -> None:
        load.stop()
        await loading

    stack.push_async_callback(stop)
    await until(probe.writing, 20, "the writer stores claims before the fault")
    return load


async def test_store_outage_sheds_at_backlog_and_drains(
    tmp_path: Path, pg_url: str, http: aiohttp.ClientSession
) -> None:
    """PostgreSQL is reachable for the writer only through a proxy, which first pauses
    (connections held, nothing answered: a frozen server) for 10 s and then cuts (every
    connection reset, connects refused) for 15 s. 25 s rather than 30 keeps the test under a
    minute; at 250 claims/s the backlog reaches its bound of 2,000 after ~8 s, so shedding
    is exercised for ~17 s, across both kinds of outage."""
    pause_s, cut_s = 10.0, 15.0
    async with TcpProxy("127.0.0.1", 5432) as proxy, contextlib.AsyncExitStack() as stack:
        redis = RedisServer(tmp_path / "redis")
        gw = Gateway(redis.url, tmp_path / "gateway", backlog_max=str(BACKLOG_MAX))
        writer = Writer(gw, pg_url.replace(":5432/", f":{proxy.port}/"))
        await stack.enter_async_context(running(redis, gw, writer))
        cid = (await create_campaign(http, gw, stock=STOCK))["id"]
        store = await open_store(pg_url)  # the test's own view, not through the proxy
        stack.push_async_callback(store.close)
        probe = Probe(redis, store, cid)
        stack.push_async_callback(probe.client.aclose)
        async with contextlib.AsyncExitStack() as loading:
            watcher = asyncio.create_task(probe.watch())

            async def unwatch() -> None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher

            loading.push_async_callback(unwatch)
            load = await start_load(loading, gw, probe, cid)
            before = await probe.meta()
            assert before is not None and before[1] < BACKLOG_MAX / 4, before

            t_out = time.monotonic()
            await proxy.pause()
            await asyncio.sleep(pause_s)  # the outage's length is the test's choice
            await proxy.cut()
            await asyncio.sleep(cut_s)
            assert probe.max_unwritten >= BACKLOG_MAX, "the store outage built no backlog"
            assert load.since(t_out, 503), "the backlog bound was reached but nothing shed"
            await proxy.restore()
            t_back = time.monotonic()

            async def granting() -> bool:
                return bool(load.since(t_back, 201))

            t_granting = await until(granting, RECOVER_S, "claims granted again after the "
                                     f"outage; see {gw.dir / 'writer.log'}")
            await asyncio.sleep(2)  # some load after recovery too

        await until(probe.drained, DRAIN_S,
                    f"the writer drains the backlog; see {gw.dir / 'writer.log'}")
        seq, _ = await probe.meta() or (-1, -1)

        assert not [a for a in load.answers if a.status == 0], "requests without an answer"
        shed = assert_statuses(load, "overloaded")
        first_shed = min(a.sent for a in shed)
        assert first_shed > t_out, "claims were shed before the store went away"
        # granted during the outage up to the bound, never far past it
        in_outage = [a for a in load.since(t_out, 201) if a.sent < first_shed]
        assert len(in_outage) >= BACKLOG_MAX - before[1] - MAX_INFLIGHT, len(in_outage)
        assert probe.max_unwritten <= BACKLOG_MAX + BATCH_SLACK, probe.max_unwritten
        # past the bound, with no writer to lower it, nothing more is granted
        past = [a for a in load.since(first_shed + 1, 201) if a.sent < t_back]
        assert not past, f"{len(past)} claims granted past the backlog bound"
        assert len(load.since(t_granting, 201)) > RATE, "claims did not go on after recovery"

        assert_nothing_lost(load, cid, seq, await store.claim_ids(cid))
        assert await probe.dead_letters() == 0
        done = await asyncio.to_thread(reconcile, writer, pg_url, cid)
        assert done.returncode == 0, done.stdout + done.stderr


async def test_redis_sigkill_with_fsync_always_loses_nothing(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """redis-server (appendfsync always) is SIGKILLed twice, each time at a random moment
    of the load, and restarted on the same port and dir 3 s later; its AOF brings back
    every grant, the gateway and the writer (SQLite store) recover by themselves."""
    crashes, down_s, seed = 2, 3.0, random.randrange(1 << 30)
    rng = random.Random(seed)
    redis = FsyncRedis(tmp_path / "redis", appendfsync="always")
    gw = Gateway(redis.url, tmp_path / "gateway")
    store_url = f"sqlite:///{tmp_path / 'claims.db'}"  # absolute: sqlite:////tmp/...
    writer = Writer(gw, store_url)
    async with running(redis, gw, writer), contextlib.AsyncExitStack() as stack:
        cid = (await create_campaign(http, gw, stock=STOCK))["id"]
        store = await open_store(store_url)
        stack.push_async_callback(store.close)
        outages: list[tuple[float, float, float]] = []  # killed, restarted, granting again
        # polled only while Redis is up: redis-py may leak a socket that meets LOADING
        probe = Probe(redis, store, cid)
        stack.push_async_callback(probe.client.aclose)
        async with contextlib.AsyncExitStack() as loading:
            load = await start_load(loading, gw, probe, cid)
            for _ in range(crashes):
                await asyncio.sleep(rng.uniform(0.5, 2.5))  # a random moment of the load
                t_kill = time.monotonic()
                await asyncio.to_thread(redis.kill)

                async def failing(t_kill: float = t_kill) -> bool:
                    return bool(load.since(t_kill + 0.2, 503))

                await until(failing, 5, f"claims answered 503 while Redis is down (seed {seed})")
                await asyncio.sleep(max(0.0, t_kill + down_s - time.monotonic()))
                await asyncio.to_thread(redis.start)  # same port and dir: the AOF replays
                t_back = time.monotonic()

                async def granting(t_back: float = t_back) -> bool:
                    return bool(load.since(t_back, 201))

                t_granting = await until(granting, RECOVER_S, f"granted again (seed {seed})")
                outages.append((t_kill, t_back, t_granting))
            await asyncio.sleep(2)  # some load after the last recovery too

        await until(probe.drained, DRAIN_S, f"the writer drains after the crashes (seed {seed}); "
                    f"see {gw.dir / 'writer.log'}")
        seq, _ = await probe.meta() or (-1, -1)

        assert not [a for a in load.answers if a.status == 0], "requests without an answer"
        shed = assert_statuses(load, "unavailable")

        def during(a: Answer) -> bool:
            return any(k - 0.1 < a.sent < g + 5 for k, _, g in outages)

        assert all(during(a) for a in shed), f"503 outside the outages (seed {seed})"
        down = [a for a in shed if any(k + 0.5 < a.sent < b for k, b, _ in outages)]
        assert down and max(a.done - a.sent for a in down) < 2.5, "503s were not quick"
        # a grant nobody heard of can only be one whose answer was lost in a crash
        heard = len([a for a in load.answers if a.status == 201])
        assert heard <= seq <= heard + len(shed), (heard, seq, len(shed))

        assert_nothing_lost(load, cid, seq, await store.claim_ids(cid))
        assert await probe.dead_letters() == 0
        done = await asyncio.to_thread(reconcile, writer, store_url, cid)
        assert done.returncode == 0, f"seed {seed}: " + done.stdout + done.stderr
