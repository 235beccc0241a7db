"""The embedded store: SQLite through aiosqlite, WAL with `synchronous=FULL`, so a
committed batch survives a crash or a power loss."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from gateway.domain import from_ms, to_ms
from gateway.durable.store import (
    AuditEntry,
    ClaimConflict,
    ClaimRow,
    StoredClaim,
    StoreReport,
    StoreUnavailable,
)

MIGRATIONS = [
    """
    CREATE TABLE campaigns (
        id TEXT PRIMARY KEY,
        spec TEXT NOT NULL,
        updated_at INTEGER NOT NULL
    );
    CREATE TABLE claims (
        claim_id TEXT PRIMARY KEY,
        campaign_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        n INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        granted_at TEXT NOT NULL,
        device TEXT NOT NULL,
        phone TEXT NOT NULL,
        ip TEXT NOT NULL,
        channel TEXT NOT NULL,
        codes TEXT NOT NULL,
        stream_id TEXT NOT NULL,
        UNIQUE (campaign_id, user_id, n),
        UNIQUE (campaign_id, seq)
    );
    """,
    """
    CREATE TABLE audit_log (
        id TEXT PRIMARY KEY,
        at TEXT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        before TEXT,
        after TEXT,
        request_id TEXT NOT NULL
    );
    CREATE INDEX audit_log_target_at ON audit_log (target, at);
    CREATE INDEX audit_log_at ON audit_log (at);
    """,
    "ALTER TABLE claims ADD COLUMN region TEXT NOT NULL DEFAULT ''",
]

INSERT_AUDIT = """
INSERT INTO audit_log (id, at, actor, action, target, before, after, request_id)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (id) DO NOTHING
"""
AUDIT_COLUMNS = "id, at, actor, action, target, before, after, request_id"

INSERT = """
INSERT INTO claims (claim_id, campaign_id, user_id, n, seq, granted_at, device, phone, ip,
                    channel, codes, stream_id, region)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (claim_id) DO NOTHING
"""


def _values(r: ClaimRow) -> tuple[object, ...]:
    e = r.event
    return (e.claim_id, e.campaign_id, e.user_id, e.n, e.seq, from_ms(e.granted_at).isoformat(),
            e.device, e.phone, e.ip, e.channel, json.dumps(r.codes), r.stream_id, e.region)


def _ms(iso: str | None) -> int | None:
    return None if iso is None else to_ms(dt.datetime.fromisoformat(iso))


class SQLiteStore:
    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    @classmethod
    async def open(cls, path: str) -> SQLiteStore:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path, isolation_level=None)
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=FULL")
        await db.execute("PRAGMA busy_timeout=5000")
        return cls(db)

    async def migrate(self) -> None:
        await self._db.execute("BEGIN IMMEDIATE")  # one migrator at a time
        try:
            await self._db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER)")
            async with self._db.execute("SELECT max(version) FROM schema_version") as cur:
                row = await cur.fetchone()
            current = (row[0] if row else None) or 0
            for version, sql in enumerate(MIGRATIONS[current:], start=current + 1):
                for statement in sql.split(";"):
                    if statement.strip():
                        await self._db.execute(statement)
                await self._db.execute("INSERT INTO schema_version VALUES (?)", (version,))
        except BaseException:
            await self._db.execute("ROLLBACK")
            raise
        await self._db.execute("COMMIT")

    async def _insert(self, sql: str, values: list[tuple[object, ...]]) -> int:
        """One transaction; rows already there are skipped; returns rows added."""
        try:
            before = self._db.total_changes
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                await self._db.executemany(sql, values)
            except BaseException:
                await self._db.execute("ROLLBACK")
                raise
            await self._db.execute("COMMIT")
            return self._db.total_changes - before
        except sqlite3.IntegrityError as e:
            raise ClaimConflict(str(e)) from e
        except sqlite3.OperationalError as e:
            raise StoreUnavailable(str(e)) from e

    async def insert_claims(self, rows: Sequence[ClaimRow]) -> int:
        return await self._insert(INSERT, [_values(r) for r in rows])

    async def insert_audit(self, entries: Sequence[AuditEntry]) -> int:
        return await self._insert(INSERT_AUDIT, [
            (e.id, from_ms(e.at).isoformat(), e.actor, e.action, e.target, e.before, e.after,
             e.request_id) for e in entries])

    async def audit_entries(self, target: str | None = None, limit: int = 1000,
                            ) -> list[AuditEntry]:
        where, args = ("WHERE target = ?", (target,)) if target is not None else ("", ())
        sql = (f"SELECT {AUDIT_COLUMNS} FROM audit_log {where} "
               "ORDER BY at DESC, rowid DESC LIMIT ?")
        async with self._db.execute(sql, (*args, limit)) as cur:
            rows = list(await cur.fetchall())
        return [AuditEntry(id=r[0], at=to_ms(dt.datetime.fromisoformat(r[1])), actor=r[2],
                           action=r[3], target=r[4], before=r[5], after=r[6],
                           request_id=r[7]) for r in reversed(rows)]

    async def save_campaign(self, campaign_id: str, spec_json: str) -> None:
        await self._db.execute(
            "INSERT INTO campaigns (id, spec, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET spec = excluded.spec, updated_at = excluded.updated_at",
            (campaign_id, spec_json, int(time.time() * 1000)),
        )

    async def claim_count(self, campaign_id: str) -> int:
        async with self._db.execute(
            "SELECT count(*) FROM claims WHERE campaign_id = ?", (campaign_id,)
        ) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def claim_ids(self, campaign_id: str) -> set[str]:
        async with self._db.execute(
            "SELECT claim_id FROM claims WHERE campaign_id = ?", (campaign_id,)
        ) as cur:
            return {str(r[0]) async for r in cur}

    async def claim_rows(self, campaign_id: str) -> list[StoredClaim]:
        async with self._db.execute(
            "SELECT claim_id, user_id, seq, device, phone, ip FROM claims WHERE campaign_id = ?",
            (campaign_id,),
        ) as cur:
            return [StoredClaim(*r) async for r in cur]
    async def report(self, campaign_id: str, bucket_s: int) -> StoreReport:
        async def rows(sql: str, *args: object) -> list[tuple[Any, ...]]:
            async with self._db.execute(sql, (campaign_id, *args)) as cur:
                return [tuple(r) async for r in cur]

        try:
            [(stored, first, last)] = await rows(
                "SELECT count(*), min(granted_at), max(granted_at) FROM claims "
                "WHERE campaign_id = ?")
            buckets = await rows(
                "SELECT CAST(strftime('%s', granted_at) AS INTEGER) / ?2 * ?2 AS b, count(*) "
                "FROM claims WHERE campaign_id = ?1 GROUP BY b ORDER BY b", bucket_s)
            channels = await rows("SELECT channel, count(*) FROM claims WHERE campaign_id = ? "
                                  "GROUP BY channel")
            regions = await rows("SELECT region, count(*) FROM claims WHERE campaign_id = ? "
                                 "GROUP BY region")
        except sqlite3.OperationalError as e:
            raise StoreUnavailable(str(e)) from e
        return StoreReport(
            stored=int(stored),
            first_ms=_ms(first), last_ms=_ms(last),
            buckets=[(int(b), int(n)) for b, n in buckets],
            by_channel={str(k): int(n) for k, n in channels},
            by_region={str(k): int(n) for k, n in regions},
        )

    async def close(self) -> None:
        await self._db.close()
