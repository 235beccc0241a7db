"""The production store: PostgreSQL through asyncpg. A batch is one statement
(`INSERT ... SELECT FROM unnest(...) ON CONFLICT (claim_id) DO NOTHING`) in one transaction;
durability is the server's `synchronous_commit=on`."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

import asyncpg

from gateway.domain import from_ms, to_ms
from gateway.durable.store import ClaimConflict, ClaimRow, StoreReport, StoreUnavailable

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
    "ALTER TABLE claims ADD COLUMN region text NOT NULL DEFAULT ''",
]

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
