"""The audit drain: moves admin audit entries from the `fc:audit` stream into the store's
`audit_log` through the writer's consumer group — its own pending entries first, then new
ones; one transaction per batch, commit, then ack and delete (the store holds them now).
Entries of dead writers are taken over after `writer_claim_idle_ms`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import msgspec
from redis.exceptions import RedisError

from gateway.durable.store import AuditEntry, StoreUnavailable, decode_audit
from gateway.durable.writer import Backoff
from gateway.events import ensure_group
from gateway.metrics import AUDIT_ENTRIES, WRITER_ERRORS
from gateway.redis.keys import AUDIT

if TYPE_CHECKING:
    from gateway.durable.writer import Writer

log = logging.getLogger(__name__)

GROUP = "writer"
BLOCK_MS = 500
JANITOR_S = 5.0


class AuditDrain:
    def __init__(self, writer: Writer) -> None:
        self.w = writer

    async def run(self) -> None:
        backoff = Backoff()
        cursor = "0"
        next_janitor = 0.0
        grouped = False
        while not self.w.stop.is_set():
            try:
                if not grouped:
                    await ensure_group(self.w.client, AUDIT, GROUP, from_start=True)
                    grouped = True
                if time.monotonic() >= next_janitor:
                    if await self._reclaim():
                        cursor = "0"
                    next_janitor = time.monotonic() + JANITOR_S
                entries = await self._read(cursor)
                if cursor == "0" and not entries:
                    cursor = ">"
                    continue
                if entries:
                    await self._handle(entries)
                backoff.reset()
            except Exception as e:  # like a claim drain: back off and start over, never die
                self.w.errors += 1
                expected = isinstance(e, StoreUnavailable | RedisError | OSError)
                WRITER_ERRORS.labels("audit").inc()
                delay = backoff.next()
                log.log(logging.WARNING if expected else logging.ERROR,
                        "audit drain: %r; retrying in %.2fs", e, delay, exc_info=not expected)
                cursor = "0"
                grouped = False  # the stream may have been lost with Redis
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.w.stop.wait(), delay)

    async def _read(self, cursor: str) -> list[Any]:
        reply: Any = await self.w.client.xreadgroup(
            GROUP, self.w.consumer, {AUDIT: cursor}, count=self.w.settings.writer_batch,
            block=BLOCK_MS if cursor == ">" else None)
        return list(reply[0][1]) if reply else []

    async def _handle(self, entries: list[Any]) -> None:
        rows: list[AuditEntry] = []
        for entry_id, fields in entries:
            if not fields:
                continue  # deleted while pending: nothing to store
            try:
                rows.append(decode_audit(fields))
            except msgspec.DecodeError as e:  # never storable: say so, and let it go
                log.error("audit entry %s is not one (%s): %r", entry_id, e, fields)
        if rows:
            added = await self.w.store.insert_audit(rows)
            AUDIT_ENTRIES.labels("stored").inc(added)
        ids = [entry_id for entry_id, _ in entries]
        async with self.w.client.pipeline(transaction=True) as pipe:
            pipe.xack(AUDIT, GROUP, *ids)
            pipe.xdel(AUDIT, *ids)
            await pipe.execute()

    async def _reclaim(self) -> int:
        reply: Any = await self.w.client.xautoclaim(
            AUDIT, GROUP, self.w.consumer, min_idle_time=self.w.settings.writer_claim_idle_ms,
            start_id="0-0", count=1000, justid=True)
        return len(reply)
