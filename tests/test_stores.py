"""Both durable stores (SQLite, PostgreSQL): migrations, idempotent batches, conflicts, upserts."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import msgspec
import pytest

from gateway.durable.store import (
    AuditEntry,
    ClaimConflict,
    ClaimRow,
    Store,
    StoredClaim,
    open_store,
)
from gateway.events import ClaimEvent

GRANTED_AT = 1_767_225_600_000  # 2026-01-01T00:00:00Z in ms


@dataclass
class Opened:
    kind: str
    url: str
    store: Store

    async def query(self, sql: str) -> list[tuple[object, ...]]:
        """Read the store's tables directly, beside the store's own connection."""
        if self.kind == "sqlite":
            with sqlite3.connect(self.url.removeprefix("sqlite:///")) as db:
                return [tuple(r) for r in db.execute(sql).fetchall()]
        conn = await asyncpg.connect(self.url)
        try:
            return [tuple(r) for r in await conn.fetch(sql)]
        finally:
            await conn.close()


@pytest.fixture
async def opened(store_url: str) -> AsyncIterator[Opened]:
    store = await open_store(store_url)
    await store.migrate()
    try:
        yield Opened(store_url.split(":", 1)[0], store_url, store)
    finally:
        await store.close()


def row(cid: str, seq: int, *, user: str | None = None, n: int = 1,
        claim_id: str | None = None) -> ClaimRow:
    ev = ClaimEvent(v=1, claim_id=claim_id or f"{cid}.{seq}", campaign_id=cid,
                    user_id=user or f"user-{seq}", n=n, seq=seq, granted_at=GRANTED_AT + seq,
                    device="dev-h", phone="", ip="127.0.0.1", channel="app")
    return ClaimRow(ev, [f"CODE-{cid}-{seq}"], f"{GRANTED_AT + seq}-0")


async def test_migrate_twice_is_harmless(opened: Opened) -> None:
    store = opened.store
    assert await store.insert_claims([row("c1", 1)]) == 1
    await store.migrate()
    await store.migrate()
    assert await store.claim_count("c1") == 1
    versions = await opened.query("SELECT version FROM schema_version")
    assert len(versions) == len(set(versions)), versions


async def test_insert_is_idempotent(opened: Opened) -> None:
    store = opened.store
    rows = [row("c1", s) for s in range(1, 51)]
    assert await store.insert_claims(rows) == 50
    assert await store.insert_claims(rows) == 0
    assert await store.claim_count("c1") == 50
    # a batch mixing stored and new rows adds only the new ones
    more = [row("c1", s) for s in range(41, 61)]
    assert await store.insert_claims(more) == 10
    assert await store.claim_count("c1") == 60
    assert await store.claim_ids("c1") == {f"c1.{s}" for s in range(1, 61)}
    rows_back = sorted(await store.claim_rows("c1"), key=lambda r: r.seq)
    assert [r.seq for r in rows_back] == list(range(1, 61))
    assert rows_back[6] == StoredClaim("c1.7", "user-7", 7, "dev-h", "", "127.0.0.1")


async def test_row_keeps_the_event(opened: Opened) -> None:
    await opened.store.insert_claims([row("c1", 7, user="alice", n=1)])
    got = await opened.query(
        "SELECT claim_id, campaign_id, user_id, n, seq, device, ip, channel, stream_id, codes "
        "FROM claims")
    assert len(got) == 1
    *head, codes = got[0]
    assert head == ["c1.7", "c1", "alice", 1, 7, "dev-h", "127.0.0.1", "app",
                    f"{GRANTED_AT + 7}-0"]
    assert json.loads(str(codes)) == ["CODE-c1-7"]


async def test_conflict_rolls_back_the_whole_batch(opened: Opened) -> None:
    store = opened.store
    assert await store.insert_claims([row("c1", 1, user="alice")]) == 1
    # a new claim id for alice's first grant: Redis must have lost data
    clash = row("c1", 2, user="alice", n=1, claim_id="c1.other")
    batch = [row("c1", 3, user="bob"), clash, row("c1", 4, user="carol")]
    with pytest.raises(ClaimConflict):
        await store.insert_claims(batch)
    assert await store.claim_count("c1") == 1
    assert await store.claim_ids("c1") == {"c1.1"}
    # the same seq under another claim id clashes too
    with pytest.raises(ClaimConflict):
        await store.insert_claims([row("c1", 1, user="dave", claim_id="c1.again")])
    # the store still works after a conflict, and the good rows go in on their own
    assert await store.insert_claims([batch[0], batch[2]]) == 2
    assert await store.claim_ids("c1") == {"c1.1", "c1.3", "c1.4"}


async def test_count_and_ids_are_per_campaign(opened: Opened) -> None:
    store = opened.store
    assert await store.claim_count("nothing") == 0
    assert await store.claim_ids("nothing") == set()
    # the same user and n in two campaigns is no conflict
    await store.insert_claims([row("a", 1, user="u"), row("b", 1, user="u"), row("b", 2)])
    assert (await store.claim_count("a"), await store.claim_count("b")) == (1, 2)
    assert await store.claim_ids("a") == {"a.1"}
    assert await store.claim_ids("b") == {"b.1", "b.2"}


async def test_save_campaign_upserts(opened: Opened) -> None:
    store = opened.store
    await store.save_campaign("c1", json.dumps({"id": "c1", "stock": 10}))
    await store.save_campaign("c2", json.dumps({"id": "c2", "stock": 5}))
    await store.save_campaign("c1", json.dumps({"id": "c1", "stock": 30}))
    got = await opened.query("SELECT id, spec FROM campaigns ORDER BY id")
    specs = {str(i): json.loads(str(s)) for i, s in got}
    assert specs == {"c1": {"id": "c1", "stock": 30}, "c2": {"id": "c2", "stock": 5}}


async def test_sqlite_is_wal_with_full_sync(tmp_path: Path) -> None:
    path = tmp_path / "claims.db"
    store = await open_store(f"sqlite:///{path}")
    try:
        await store.migrate()
        await store.insert_claims([row("c1", 1)])
        # synchronous is a property of the connection: ask the store's own
        db = store._db  # type: ignore[attr-defined]
        async with db.execute("PRAGMA synchronous") as cur:
            assert await cur.fetchone() == (2,)  # FULL
    finally:
        await store.close()
    with sqlite3.connect(path) as db:  # journal_mode=WAL is kept in the file
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def audit(n: int, target: str = "campaign:c1", **over: object) -> AuditEntry:
    doc: dict[str, object] = {
        "id": f"a{n}", "at": GRANTED_AT + n, "actor": "deploy", "action": "campaign.pause",
        "target": target, "before": '{"status": "live"}', "after": '{"status": "paused"}',
        "request_id": f"rid-{n}"}
    doc.update(over)
    return msgspec.convert(doc, AuditEntry)


async def test_audit_entries_are_stored_once_and_read_back(opened: Opened) -> None:
    store = opened.store
    entries = [audit(1), audit(2, before=None), audit(3, target="campaign:c2", after=None)]
    assert await store.insert_audit(entries) == 3
    assert await store.insert_audit([audit(1), audit(4)]) == 1  # a re-delivery is skipped
    got = await store.audit_entries()
    assert [e.id for e in got] == ["a1", "a2", "a3", "a4"]  # oldest first
    first = got[0]
    assert msgspec.structs.replace(first, before=None, after=None) == audit(
        1, before=None, after=None)  # ids, time (ms), actor, action, target, request id
    assert json.loads(first.before or "") == {"status": "live"}
    assert json.loads(first.after or "") == {"status": "paused"}
    assert (got[1].before, got[2].after) == (None, None)
    assert [e.id for e in await store.audit_entries("campaign:c1")] == ["a1", "a2", "a4"]
    assert [e.id for e in await store.audit_entries("campaign:c1", limit=2)] == ["a2", "a4"]
    assert await store.audit_entries("campaign:none") == []
    rows = await opened.query("SELECT actor, action, target, request_id FROM audit_log "
                              "WHERE id = 'a3'")
    assert rows == [("deploy", "campaign.pause", "campaign:c2", "rid-3")]
