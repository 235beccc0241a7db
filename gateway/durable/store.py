"""The durable store's contract: a Protocol both backends (SQLite, PostgreSQL) implement,
the rows it stores (claims, admin audit entries), and its two failure kinds.

    StoreError
     ├── StoreUnavailable   the store cannot be reached: back off and retry the batch
     └── ClaimConflict      a row breaks a unique key other than claim_id: Redis lost data
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import msgspec

from gateway.events import ClaimEvent


class StoreError(Exception):
    pass


class StoreUnavailable(StoreError):
    pass


class ClaimConflict(StoreError):
    pass


class ClaimRow(msgspec.Struct, frozen=True):
    event: ClaimEvent
    codes: list[str]  # the grant's coupon codes
    stream_id: str  # where it came from, for audits


class StoredClaim(msgspec.Struct, frozen=True):
    """What an audit reads back of a stored claim (`device`, `phone` are keyed hashes)."""

    claim_id: str
    user_id: str
    seq: int
    device: str
    phone: str
    ip: str
class AuditEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One admin action, as `gateway.http.audit.record` writes it to the audit stream and
    the writer stores it. `before`/`after` are JSON documents (or None), `at` is ms."""

    id: str  # unique per action: the store's key, so a re-delivered entry is stored once
    at: int
    actor: str  # the admin token's name
    action: str  # e.g. campaign.create, campaign.pause
    target: str  # e.g. campaign:<id>
    before: str | None = None
    after: str | None = None
    request_id: str = ""


_AUDIT_FIELD = "entry"
_audit_decoder = msgspec.json.Decoder(AuditEntry)
_audit_encoder = msgspec.json.Encoder()


def audit_fields(entry: AuditEntry) -> dict[str, bytes]:
    """The audit stream entry for `entry`."""
    return {_AUDIT_FIELD: _audit_encoder.encode(entry)}


def decode_audit(fields: dict[Any, Any]) -> AuditEntry:
    """Raises msgspec.DecodeError for an entry that is not an audit entry."""
    raw = fields.get(_AUDIT_FIELD)
    if raw is None:
        raise msgspec.ValidationError("not an audit entry: no `entry` field")
    return _audit_decoder.decode(raw)
class StoreReport(msgspec.Struct, frozen=True):
    """What the store knows of a campaign's grants, for reports."""

    stored: int
    first_ms: int | None  # the first and the last grant's Redis TIME
    last_ms: int | None
    buckets: list[tuple[int, int]]  # (bucket start, unix s; grants in it), oldest first
    by_channel: dict[str, int]
    by_region: dict[str, int]


class Store(Protocol):
    async def migrate(self) -> None:
        """Create or upgrade the schema."""

    async def insert_claims(self, rows: Sequence[ClaimRow]) -> int:
        """Insert in one transaction, skipping claim ids already stored; returns rows added."""

    async def save_campaign(self, campaign_id: str, spec_json: str) -> None:
        """Upsert a campaign's spec, so Redis can be rebuilt from the store."""

    async def insert_audit(self, entries: Sequence[AuditEntry]) -> int:
        """Insert in one transaction, skipping ids already stored; returns rows added."""

    async def audit_entries(self, target: str | None = None, limit: int = 1000,
                            ) -> list[AuditEntry]:
        """The newest `limit` entries (of one target when given), oldest first."""

    async def claim_count(self, campaign_id: str) -> int: ...

    async def claim_ids(self, campaign_id: str) -> set[str]: ...

    async def claim_rows(self, campaign_id: str) -> list[StoredClaim]: ...
    async def report(self, campaign_id: str, bucket_s: int) -> StoreReport:
        """Grants per `bucket_s` seconds of granted_at, by channel and by region."""

    async def close(self) -> None: ...


async def open_store(url: str) -> Store:
    if url.startswith("sqlite://"):
        from gateway.durable.sqlite import SQLiteStore

        return await SQLiteStore.open(url.removeprefix("sqlite:///"))
    if url.startswith(("postgresql://", "postgres://")):
        from gateway.durable.postgres import PostgresStore

        return await PostgresStore.open(url)
    raise ValueError(f"unsupported store URL {url!r}: use sqlite:///path or postgresql://...")
