"""The writer: drains each campaign's claim stream (and the admin audit stream, see
gateway/durable/audit.py) into the durable store through the `writer` consumer group — its
own pending entries first, then new ones; one transaction per batch, commit, then ack
(lua/ack.lua, which also lowers the campaign's backlog). Entries of dead consumers are
reclaimed (XAUTOCLAIM); an entry that fails `max_deliveries` times goes to the campaign's
dead-letter stream. Streams are trimmed only below what every group acked."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from typing import Any

import msgspec
from redis.exceptions import RedisError

from gateway.domain import CampaignSpec, coupon_code
from gateway.durable.store import ClaimConflict, ClaimRow, Store, StoreUnavailable
from gateway.events import consumer_name, decode_event, ensure_group
from gateway.metrics import STORE_ROWS, WRITER_DEAD, WRITER_ERRORS, WRITER_LAG, WRITER_WRITTEN
from gateway.redis.client import RedisClient
from gateway.redis.keys import CAMPAIGNS, CampaignKeys
from gateway.redis.scripts import Scripts
from gateway.settings import Settings

log = logging.getLogger(__name__)

GROUP = "writer"
DISCOVER_S = 1.0
JANITOR_S = 5.0
TRIM_S = 10.0
BLOCK_MS = 500

_spec = msgspec.json.Decoder(CampaignSpec)


def stream_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class Backoff:
    """Exponential backoff with full jitter."""

    def __init__(self, first: float = 0.1, cap: float = 5.0) -> None:
        self.first, self.cap, self.attempt = first, cap, 0

    def next(self) -> float:
        self.attempt += 1
        return random.uniform(0, min(self.cap, self.first * 2**self.attempt))

    def reset(self) -> None:
        self.attempt = 0


class Writer:
    """Runs one drain per campaign until `close()`; a SIGTERM finishes the batch in hand."""

    def __init__(self, client: RedisClient, store: Store, settings: Settings,
                 consumer: str | None = None) -> None:
        self.client = client
        self.scripts = Scripts(client, settings.scripts_dir)
        self.store = store
        self.settings = settings
        self.consumer = consumer or consumer_name()
        self.stop = asyncio.Event()
        self.written = 0
        self.dead_lettered = 0
        self.errors = 0

    async def run(self) -> None:
        from gateway.durable.audit import AuditDrain

        audit = asyncio.create_task(AuditDrain(self).run())
        drains: dict[str, list[asyncio.Task[None]]] = {}
        backoff = Backoff()
        while not self.stop.is_set():
            try:
                for member in await self.client.smembers(CAMPAIGNS):
                    cid = str(member)
                    if cid not in drains:
                        # one drain per stream: a sharded campaign has one per shard
                        meta = CampaignKeys.of(cid).meta
                        shards = int(await self.client.hget(meta, "shards") or 1)
                        drains[cid] = [asyncio.create_task(CampaignDrain(self, cid, k).run())
                                       for k in range(shards)]
                backoff.reset()
                delay = DISCOVER_S
            except (RedisError, OSError) as e:
                log.warning("writer cannot list campaigns: %r", e)
                delay = backoff.next()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), delay)
        await asyncio.gather(audit, *(t for ts in drains.values() for t in ts),
                             return_exceptions=True)

    def close(self) -> None:
        self.stop.set()


class CampaignDrain:
    def __init__(self, writer: Writer, campaign_id: str, shard: int = 0) -> None:
        self.w = writer
        self.cid = campaign_id
        self.shard = shard
        self.keys = CampaignKeys.of(campaign_id, shard)
        self.spec: CampaignSpec | None = None
        self.backoff = Backoff()

    async def run(self) -> None:
        WRITER_DEAD.labels(self.cid)  # exported at 0, so the first dead letter is an increase
        WRITER_WRITTEN.labels(self.cid)
        cursor = "0"
        next_janitor = next_trim = 0.0
        while not self.w.stop.is_set():
            try:
                if self.spec is None:
                    await self._load_spec()
                now = time.monotonic()
                if now >= next_janitor:
                    if await self._reclaim():
                        cursor = "0"
                    next_janitor = now + JANITOR_S
                if now >= next_trim:
                    await self._trim()
                    STORE_ROWS.labels(self.cid).set(await self.w.store.claim_count(self.cid))
                    next_trim = now + TRIM_S
                entries = await self._read(cursor)
                if cursor == "0" and not entries:
                    cursor = ">"
                    continue
                left_pending = await self._handle(entries) if entries else 0
                cursor = "0" if left_pending else ">"
                self.backoff.reset()
            except Exception as e:  # a drain never dies: it backs off and starts over
                self.w.errors += 1
                expected = isinstance(e, StoreUnavailable | RedisError | OSError)
                kind = "store" if isinstance(e, StoreUnavailable) else (
                    "redis" if expected else "unexpected")
                WRITER_ERRORS.labels(kind).inc()
                delay = self.backoff.next()
                log.log(logging.WARNING if expected else logging.ERROR,
                        "writer %s: %r; retrying in %.2fs", self.cid, e, delay,
                        exc_info=not expected)
                cursor = "0"
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.w.stop.wait(), delay)

    async def _load_spec(self) -> None:
        spec_json = await self.w.client.hget(CampaignKeys.of(self.cid).meta, "spec")
        if spec_json is None:
            raise StoreUnavailable(f"campaign {self.cid} has no spec in Redis yet")
        self.spec = _spec.decode(spec_json)
        await self.w.store.save_campaign(self.cid, str(spec_json))
        await ensure_group(self.w.client, self.keys.events, GROUP, from_start=True)

    async def _read(self, cursor: str) -> list[Any]:
        reply: Any = await self.w.client.xreadgroup(
            GROUP, self.w.consumer, {self.keys.events: cursor},
            count=self.w.settings.writer_batch, block=BLOCK_MS if cursor == ">" else None,
        )
        return list(reply[0][1]) if reply else []

    def _row(self, entry_id: str, fields: dict[Any, Any]) -> ClaimRow:
        ev = decode_event(fields)
        if ev.campaign_id != self.cid:
            raise msgspec.ValidationError(f"event of campaign {ev.campaign_id} in {self.cid}")
        assert self.spec is not None
        key = self.w.settings.signing_key
        codes = [coupon_code(key, self.cid, ev.seq, i, ev.user_id)
                 for i in range(len(self.spec.coupons))]
        return ClaimRow(ev, codes, entry_id)

    async def _handle(self, entries: list[Any]) -> int:
        """Store a batch, ack what is stored; returns how many entries stay pending."""
        done: list[str] = []
        rows: list[ClaimRow] = []
        fields_by_id = dict(entries)
        bad: list[tuple[str, dict[Any, Any], str]] = []
        for entry_id, fields in entries:
            if not fields:  # trimmed away while pending: nothing left to store
                done.append(entry_id)
                continue
            try:
                rows.append(self._row(entry_id, fields))
            except (msgspec.ValidationError, ValueError) as e:
                bad.append((entry_id, fields, f"undecodable: {e}"))
        if rows:
            try:
                self._written(await self.w.store.insert_claims(rows))
                done.extend(r.stream_id for r in rows)
                newest = max(r.event.granted_at for r in rows)
                WRITER_LAG.labels(self.cid).set(max(0.0, time.time() - newest / 1000))
            except ClaimConflict:
                for r in rows:  # isolate the rows that clash
                    try:
                        self._written(await self.w.store.insert_claims([r]))
                        done.append(r.stream_id)
                    except ClaimConflict as e:
                        log.error("CLAIM CONFLICT in %s (%s): RedisClient may have lost data: %s",
                                  self.cid, r.event.claim_id, e)
                        bad.append((r.stream_id, fields_by_id[r.stream_id], f"conflict: {e}"))
        if self.w.settings.fault == "writer_crash_after_commit" and rows:
            log.error("fault point: exiting between commit and ack")
            os._exit(137)
        left = 0
        uncounted: list[str] = []  # not claim events: lua/claim.lua never counted them
        for entry_id, fields, reason in bad:
            if await self._deliveries(entry_id) >= self.w.settings.writer_max_deliveries:
                await self.w.client.xadd(self.keys.dead, {
                    **fields, "dead_entry_id": entry_id, "dead_reason": reason[:500]})
                self.w.dead_lettered += 1
                WRITER_DEAD.labels(self.cid).inc()
                log.error("dead-lettered %s %s: %s", self.cid, entry_id, reason)
                (uncounted if reason.startswith("undecodable") else done).append(entry_id)
            else:
                left += 1
        if done:
            await self.w.scripts.ack(self.cid, GROUP, done, self.shard)
        if uncounted:
            await self.w.client.xack(self.keys.events, GROUP, *uncounted)
        return left

    def _written(self, n: int) -> None:
        self.w.written += n
        WRITER_WRITTEN.labels(self.cid).inc(n)

    async def _deliveries(self, entry_id: str) -> int:
        info: Any = await self.w.client.xpending_range(
            self.keys.events, GROUP, min=entry_id, max=entry_id, count=1)
        return int(info[0]["times_delivered"]) if info else 0

    async def _reclaim(self) -> int:
        """Take over entries that other (dead) writers left idle too long."""
        reply: Any = await self.w.client.xautoclaim(
            self.keys.events, GROUP, self.w.consumer,
            min_idle_time=self.w.settings.writer_claim_idle_ms, start_id="0-0", count=1000,
            justid=True)
        return len(reply)  # justid=True: redis-py returns just the claimed ids

    async def _trim(self) -> None:
        """XTRIM MINID below the lowest entry any group still needs, and keep the retention."""
        now_ms = int(time.time() * 1000)
        floor = (now_ms - self.w.settings.stream_retention_s * 1000, 0)
        groups: Any = await self.w.client.xinfo_groups(self.keys.events)
        for g in groups:
            if int(g["pending"]) > 0:
                summary: Any = await self.w.client.xpending(self.keys.events, g["name"])
                low = stream_id(str(summary["min"]))
            else:
                low = stream_id(str(g["last-delivered-id"]))
            floor = min(floor, low)
        if floor > (0, 0):
            await self.w.client.xtrim(self.keys.events, minid=f"{floor[0]}-{floor[1]}",
                                      approximate=True)



async def open_store_patiently(url: str, stop: asyncio.Event) -> Store | None:
    """Open (and migrate) the store, retrying while it is down; None when stopped first."""
    from gateway.durable.store import open_store

    backoff = Backoff()
    while not stop.is_set():
        try:
            store = await open_store(url)
            await store.migrate()
            return store
        except Exception as e:  # unreachable, refusing, locked: keep trying until stopped
            delay = backoff.next()
            log.warning("store %s unavailable: %r; retrying in %.2fs", url.split("@")[-1], e, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
    return None


async def serve_writer(settings: Settings) -> None:
    """The `flashclaim writer` process: until SIGTERM/SIGINT."""
    import signal

    from gateway.redis.client import connect, redis_client

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if settings.writer_metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.writer_metrics_port, addr=settings.writer_metrics_host)
    store = await open_store_patiently(settings.store_url, stop)
    if store is None:
        return
    client = redis_client(settings, max_connections=512)
    with contextlib.suppress(RedisError, OSError):  # else the first command connects
        await connect(client)
    writer = Writer(client, store, settings, consumer=settings.writer_name or None)
    task = asyncio.create_task(writer.run())
    await stop.wait()
    writer.close()
    await task
    await store.close()
    await client.aclose()
