"""Reconciliation: RedisClient (units taken, sequence, identity counters) against the stream
(entries the writer has not acked) against the store (rows). `--repair` re-inserts what the
stream still holds and the store lacks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from gateway.domain import CampaignSpec
from gateway.durable.store import ClaimRow, Store
from gateway.events import decode_event
from gateway.redis.client import RedisClient
from gateway.redis.keys import CampaignKeys
from gateway.redis.scripts import Scripts
from gateway.redis.shards import ShardMover, read_shards
from gateway.settings import default_lua_dir


class Check(msgspec.Struct):
    name: str
    ok: bool
    detail: str


class Report(msgspec.Struct):
    campaign_id: str
    granted: int  # Redis sequence: grants made
    taken: int  # stock units taken: total - remaining - lapsed with a round
    identities: int  # sum of the per-user counters
    unwritten: int  # grants the writer has not acked
    stored: int  # rows in the store
    repaired: int
    checks: list[Check]
    in_transit: int = 0  # units lent by one shard and not yet settled

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


async def _repair(
    client: RedisClient, store: Store, cid: str, spec: CampaignSpec, key: bytes
) -> int:
    have = await store.claim_ids(cid)
    inserted = 0
    for shard in range(spec.shards):
        stream = CampaignKeys.of(cid, shard).events
        inserted += await _repair_stream(client, store, cid, spec, key, stream, have)
    return inserted


async def _repair_stream(
    client: RedisClient, store: Store, cid: str, spec: CampaignSpec, key: bytes, stream: str,
    have: set[str],
) -> int:
    from gateway.domain import coupon_code

    missing: list[ClaimRow] = []
    start = "-"
    while True:
        entries: Any = await client.xrange(stream, min=start, count=1000)
        for entry_id, fields in entries:
            try:
                ev = decode_event(fields)
            except (msgspec.ValidationError, ValueError):
                continue  # not a claim event: the writer dead-letters it
            if ev.claim_id not in have:
                codes = [coupon_code(key, cid, ev.seq, i, ev.user_id)
                         for i in range(len(spec.coupons))]
                missing.append(ClaimRow(ev, codes, str(entry_id)))
        if len(entries) < 1000:
            break
        start = "(" + str(entries[-1][0])
    inserted = 0
    for i in range(0, len(missing), 1000):
        inserted += await store.insert_claims(missing[i : i + 1000])
    return inserted


async def reconcile(
    client: RedisClient, store: Store, campaign_id: str, *, signing_key: bytes,
    repair: bool = False, lua_dir: Path | None = None,
) -> Report:
    meta = await client.hgetall(CampaignKeys.of(campaign_id).meta)
    if not meta:
        raise LookupError(f"no campaign {campaign_id!r} in Redis")
    spec = msgspec.json.decode(meta["spec"], type=CampaignSpec)
    if repair and spec.shards > 1:
        await ShardMover(Scripts(client, lua_dir or default_lua_dir())).recover(
            campaign_id, spec.shards, stuck_ms=0)
    repaired = await _repair(client, store, campaign_id, spec, signing_key) if repair else 0
    parts = await read_shards(client, campaign_id, spec.shards)
    granted = sum(p.seq for p in parts)
    # units that lapsed with a round (rounds without carry-over) were never taken
    forfeited = int(meta.get("forfeited", 0))
    taken = sum(p.total - p.remaining for p in parts) - forfeited
    unwritten = sum(p.unwritten for p in parts)
    in_transit = sum(p.lent for p in parts)
    identities = 0
    for shard in range(spec.shards):
        identities += sum(int(v) for v in await client.hvals(CampaignKeys.of(campaign_id,
                                                                               shard).users))
    stored = await store.claim_count(campaign_id)
    checks = [
        Check("stock", taken == granted, f"units taken {taken} vs grants {granted}"),
        Check("identities", identities == granted, f"user counters {identities} vs {granted}"),
        Check("no extra rows", stored <= granted, f"store {stored} vs grants {granted}"),
        Check("nothing lost", stored + unwritten >= granted,
              f"store {stored} + unwritten {unwritten} vs grants {granted}"),
    ]
    if spec.shards > 1:
        checks.append(Check("no units in transit", in_transit == 0,
                            f"{in_transit} units lent between shards and not settled "
                            "(--repair finishes the transfers)"))
    return Report(campaign_id, granted, taken, identities, unwritten, stored, repaired, checks,
                  in_transit)


def render(reports: list[Report]) -> str:
    head = f"{'campaign':<24} {'granted':>8} {'taken':>8} {'ident':>8} {'unwritten':>9} " \
           f"{'stored':>8} {'repaired':>8}  verdict"
    lines = [head, "-" * len(head)]
    for r in reports:
        verdict = "ok" if r.ok else "MISMATCH: " + "; ".join(
            c.detail for c in r.checks if not c.ok)
        lines.append(f"{r.campaign_id:<24} {r.granted:>8} {r.taken:>8} {r.identities:>8} "
                     f"{r.unwritten:>9} {r.stored:>8} {r.repaired:>8}  {verdict}")
    return "\n".join(lines)
