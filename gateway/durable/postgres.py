"""The production store: PostgreSQL through asyncpg. A batch is one statement
(`INSERT ... SELECT FROM unnest(...) ON CONFLICT (claim_id) DO NOTHING`) in one transaction;
durability is the server's `synchronous_commit=on`."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

import asyncpg

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
        id text PRIMARY KEY,
        spec jsonb NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE claims (
        claim_id text PRIMARY KEY,
        campaign_id text NOT NULL,
        user_id text NOT NULL,
        n integer NOT NULL,
        seq bigint NOT NULL,
        granted_at timestamptz NOT NULL,
        device text NOT NULL,
        phone text NOT NULL,
        ip text NOT NULL,
        channel text NOT NULL,
        codes jsonb NOT NULL,
        stream_id text NOT NULL,
        UNIQUE (campaign_id, user_id, n),
        UNIQUE (campaign_id, seq)
    );
    """,
    """
    CREATE TABLE audit_log (
        id text PRIMARY KEY,
        at timestamptz NOT NULL,
        actor text NOT NULL,
        action text NOT NULL,
        target text NOT NULL,
        before jsonb,
        after jsonb,
        request_id text NOT NULL
    );
    CREATE INDEX audit_log_target_at ON audit_log (target, at);
    CREATE INDEX audit_log_at ON audit_log (at);
    """,
    "ALTER TABLE claims ADD COLUMN region text NOT NULL DEFAULT ''",
]

INSERT_AUDIT = """
INSERT INTO audit_log (id, at, actor, action, target, before, after, request_id)
SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::text[], $4::text[], $5::text[],
                     $6::jsonb[], $7::jsonb[], $8::text[])
ON CONFLICT (id) DO NOTHING
"""
AUDIT_COLUMNS = "id, at, actor, action, target, before::text, after::text, request_id"

INSERT = """
INSERT INTO claims (claim_id, campaign_id, user_id, n, seq, granted_at, device, phone, ip,
                    channel, codes, stream_id, region)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::bigint[],
                     $6::timestamptz[], $7::text[], $8::text[], $9::text[], $10::text[],
                     $11::jsonb[], $12::text[], $13::text[])
ON CONFLICT (claim_id) DO NOTHING
"""

_UNAVAILABLE = (OSError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                asyncpg.CannotConnectNowError, asyncpg.OperatorInterventionError)


class PostgresStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    async def open(cls, url: str) -> PostgresStore:
        try:
            pool = await asyncpg.create_pool(url, min_size=1, max_size=4, command_timeout=10,
                                             timeout=5)
        except _UNAVAILABLE as e:
            raise StoreUnavailable(str(e)) from e
        return cls(pool)

    async def migrate(self) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(7212007)")
            await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer)")
            current = await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_version")
            for version, sql in enumerate(MIGRATIONS[current:], start=current + 1):
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_version VALUES ($1)", version)

    async def insert_claims(self, rows: Sequence[ClaimRow]) -> int:
        cols: list[list[object]] = [[] for _ in range(13)]
        for r in rows:
            e = r.event
            for col, value in zip(cols, (
                e.claim_id, e.campaign_id, e.user_id, e.n, e.seq, from_ms(e.granted_at),
                e.device, e.phone, e.ip, e.channel, json.dumps(r.codes), r.stream_id, e.region,
            ), strict=True):
                col.append(value)
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                status = await conn.execute(INSERT, *cols)
        except (asyncpg.UniqueViolationError, asyncpg.DataError) as e:
            raise ClaimConflict(str(e)) from e
        except _UNAVAILABLE as e:
            raise StoreUnavailable(repr(e)) from e
        return int(status.split()[-1])

    async def insert_audit(self, entries: Sequence[AuditEntry]) -> int:
        cols: list[list[object]] = [[] for _ in range(8)]
        for e in entries:
            for col, value in zip(cols, (e.id, from_ms(e.at), e.actor, e.action, e.target,
                                         e.before, e.after, e.request_id), strict=True):
                col.append(value)
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                status = await conn.execute(INSERT_AUDIT, *cols)
        except _UNAVAILABLE as e:
            raise StoreUnavailable(repr(e)) from e
        return int(status.split()[-1])

    async def audit_entries(self, target: str | None = None, limit: int = 1000,
                            ) -> list[AuditEntry]:
        where = "WHERE target = $2" if target is not None else ""
        rows = await self._pool.fetch(
            f"SELECT {AUDIT_COLUMNS} FROM audit_log {where} "
            "ORDER BY at DESC, id DESC LIMIT $1", limit, *([] if target is None else [target]))
        return [AuditEntry(id=r[0], at=to_ms(r[1]), actor=r[2], action=r[3], target=r[4],
                           before=r[5], after=r[6], request_id=r[7]) for r in reversed(rows)]

    async def save_campaign(self, campaign_id: str, spec_json: str) -> None:
        try:
            await self._pool.execute(
                "INSERT INTO campaigns (id, spec, updated_at) VALUES ($1, $2::jsonb, $3) "
                "ON CONFLICT (id) DO UPDATE SET spec = excluded.spec, "
                "updated_at = excluded.updated_at",
                campaign_id, spec_json, from_ms(int(time.time() * 1000)),
            )
        except _UNAVAILABLE as e:
            raise StoreUnavailable(repr(e)) from e

    async def claim_count(self, campaign_id: str) -> int:
        return int(await self._pool.fetchval(
            "SELECT count(*) FROM claims WHERE campaign_id = $1", campaign_id))

    async def claim_ids(self, campaign_id: str) -> set[str]:
        rows = await self._pool.fetch(
            "SELECT claim_id FROM claims WHERE campaign_id = $1", campaign_id)
        return {r[0] for r in rows}

    async def claim_rows(self, campaign_id: str) -> list[StoredClaim]:
        rows = await self._pool.fetch(
            "SELECT claim_id, user_id, seq, device, phone, ip FROM claims "
            "WHERE campaign_id = $1", campaign_id)
        return [StoredClaim(*r) for r in rows]
    async def report(self, campaign_id: str, bucket_s: int) -> StoreReport:
        try:
            async with self._pool.acquire() as conn:
                stored, first, last = await conn.fetchrow(
                    "SELECT count(*), min(granted_at), max(granted_at) FROM claims "
                    "WHERE campaign_id = $1", campaign_id)
                buckets = await conn.fetch(
                    "SELECT (floor(extract(epoch FROM granted_at) / $2) * $2)::bigint AS b, "
                    "count(*) FROM claims WHERE campaign_id = $1 GROUP BY b ORDER BY b",
                    campaign_id, bucket_s)
                channels = await conn.fetch(
                    "SELECT channel, count(*) FROM claims WHERE campaign_id = $1 "
                    "GROUP BY channel", campaign_id)
                regions = await conn.fetch(
                    "SELECT region, count(*) FROM claims WHERE campaign_id = $1 "
                    "GROUP BY region", campaign_id)
        except _UNAVAILABLE as e:
            raise StoreUnavailable(repr(e)) from e
        return StoreReport(
            stored=int(stored),
            first_ms=None if first is None else to_ms(first),
            last_ms=None if last is None else to_ms(last),
            buckets=[(int(r[0]), int(r[1])) for r in buckets],
            by_channel={str(r[0]): int(r[1]) for r in channels},
            by_region={str(r[0]): int(r[1]) for r in regions},
        )

    async def close(self) -> None:
        await self._pool.close()
