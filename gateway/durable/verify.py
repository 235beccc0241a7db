"""The verdict after a release rehearsal: waits for the writer to drain, then checks stock,
identity limits, store == Redis, and that every grant the clients saw (JSON-lines logs in
the record types below) is stored under the same claim id; `flashclaim verify` runs it."""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import click
import msgspec

from gateway.domain import CampaignSpec, claim_id, keyed_hash
from gateway.durable.store import StoredClaim, open_store
from gateway.redis.client import RedisClient
from gateway.redis.keys import CampaignKeys
from gateway.settings import load_settings

SHOWN = 20  # violations listed per check; the rest are counted


# ---- what load-test clients record, one JSON object a line ---------------------------------

class Seen(msgspec.Struct, tag_field="t", tag="id", kw_only=True):
    """An identity a client used (whether or not it won)."""

    role: str
    user: str
    dev: str = ""
    phone: str = ""
    ip: str = ""


class GrantSeen(Seen, tag="grant", kw_only=True):
    """A `201` a client received: the identity it claimed with and what it was told."""

    claim_id: str
    seq: int
    at: float  # client clock, seconds


class RestockDone(msgspec.Struct, tag_field="t", tag="restock"):
    """A restock an operator made during the run (accepted by the admin API)."""

    quantity: int


class Tally(msgspec.Struct, tag_field="t", tag="tally"):
    """One process's answers by status, per role (for the run's summary)."""

    role: str
    statuses: dict[str, int]


Record = Seen | GrantSeen | RestockDone | Tally
record_encoder = msgspec.json.Encoder()
_record_decoder = msgspec.json.Decoder(Record)


def read_records(paths: Iterable[Path]) -> list[Record]:
    """Records from files, or from every `*.jsonl` file in a directory."""
    out: list[Record] = []
    for path in paths:
        files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
        for f in files:
            with f.open("rb") as lines:
                out.extend(_record_decoder.decode(line) for line in lines if line.strip())
    return out


# ---- the checks ----------------------------------------------------------------------------

class Verdict(msgspec.Struct):
    campaign_id: str
    total: int = 0  # stock plus restocks, in Redis
    granted: int = 0  # the Redis sequence
    stored: int = 0
    client_grants: int = 0
    unwritten: int = 0
    violations: list[str] = []

    @property
    def ok(self) -> bool:
        return not self.violations

    def fail(self, items: list[str]) -> None:
        self.violations.extend(items[:SHOWN])
        if len(items) > SHOWN:
            self.violations.append(f"... and {len(items) - SHOWN} more like these")


async def drain(client: RedisClient, campaign_id: str, timeout_s: float) -> int:
    """Wait for the writer to store every grant; the unwritten count left at the timeout."""
    meta = CampaignKeys.of(campaign_id).meta
    deadline = time.monotonic() + timeout_s
    while True:
        left = int(await client.hget(meta, "unwritten") or 0)
        if left <= 0 or time.monotonic() >= deadline:
            return left
        await asyncio.sleep(0.2)


def over_limits(label: str, counts: Counter[str], limit: int | None) -> list[str]:
    if limit is None:
        return []
    return [f"{label} {who!r} holds {n} grants, over its limit {limit}"
            for who, n in counts.most_common() if who and n > limit]


def differences(label: str, redis_counts: dict[str, int], stored: Counter[str]) -> list[str]:
    return [f"{label} {k!r}: Redis counts {redis_counts.get(k, 0)}, the store has {stored[k]}"
            for k in sorted(set(redis_counts) | {k for k in stored if k})
            if redis_counts.get(k, 0) != stored[k]]


def check_store(v: Verdict, spec: CampaignSpec, rows: list[StoredClaim],
                redis_counts: dict[str, dict[str, int]]) -> None:
    lim = spec.limits
    seqs = Counter(r.seq for r in rows)
    v.fail([f"claim {claim_id(v.campaign_id, s)} is missing from the store"
            for s in range(1, v.granted + 1) if s not in seqs])
    v.fail([f"the store has claim {r.claim_id} that Redis never granted"
            for r in rows if not 1 <= r.seq <= v.granted or r.claim_id != claim_id(
                v.campaign_id, r.seq)])
    per = {k: Counter(getattr(r, k) for r in rows) for k in ("user_id", "device", "phone", "ip")}
    v.fail(over_limits("user", per["user_id"], lim.per_user))
    v.fail(over_limits("device", per["device"], lim.per_device))
    v.fail(over_limits("phone", per["phone"], lim.per_phone))
    v.fail(over_limits("address", per["ip"], lim.per_ip))
    v.fail(differences("user", redis_counts["users"], per["user_id"]))
    v.fail(differences("device", redis_counts["devices"], per["device"]))
    v.fail(differences("address", redis_counts["ips"], per["ip"]))


def check_clients(v: Verdict, spec: CampaignSpec, records: list[Record],
                  rows: list[StoredClaim], pii_key: bytes) -> None:
    """Every grant a client saw is stored as that client's, and no identity the clients
    used got more than its limit (the client's view, independent of what Redis counted)."""
    lim = spec.limits
    stored = {r.claim_id: r for r in rows}
    grants: dict[str, GrantSeen] = {}
    clashes = []
    for g in (r for r in records if isinstance(r, GrantSeen)):
        first = grants.setdefault(g.claim_id, g)
        if first.user != g.user:
            clashes.append(f"claim {g.claim_id} was granted to both {first.user!r} and "
                           f"{g.user!r}")
    v.client_grants = len(grants)
    v.fail(clashes)
    restocks = [r.quantity for r in records if isinstance(r, RestockDone)]
    if restocks and v.total != spec.stock + sum(restocks):
        v.fail([f"stock {spec.stock} + restocks {sum(restocks)} made during the run, "
                f"but Redis has {v.total} in total"])
    if v.client_grants > v.total:
        v.fail([f"clients saw {v.client_grants} grants of a stock of {v.total}"])
    unstored, mismatched = [], []
    for g in grants.values():
        row = stored.get(g.claim_id)
        if row is None:
            unstored.append(f"the 201 for claim {g.claim_id} ({g.user!r}) is not in the store")
            continue
        want = (g.user, g.seq, keyed_hash(pii_key, "d:" + g.dev) if g.dev else "",
                keyed_hash(pii_key, "p:" + g.phone) if g.phone else "", g.ip)
        have = (row.user_id, row.seq, row.device, row.phone, row.ip)
        for name, w, h in zip(("user", "seq", "device", "phone", "address"), want, have,
                              strict=True):
            if w and w != h:
                mismatched.append(f"claim {g.claim_id}: the client claimed with {name} "
                                  f"{w!r}, the store has {h!r}")
    for label, attr, limit in (("user", "user", lim.per_user), ("device", "dev", lim.per_device),
                               ("phone", "phone", lim.per_phone), ("address", "ip", lim.per_ip)):
        counts = Counter(getattr(g, attr) for g in grants.values())
        v.fail([f"client view: {m}" for m in over_limits(label, counts, limit)])
    v.fail(unstored)
    v.fail(mismatched)


async def verify(client: RedisClient, store_url: str, campaign_id: str, records: list[Record], *,
                 pii_key: bytes, drain_timeout_s: float = 60.0) -> Verdict:
    keys = CampaignKeys.of(campaign_id)
    meta: Any = await client.hgetall(keys.meta)
    if not meta:
        raise LookupError(f"no campaign {campaign_id!r} in Redis")
    spec = msgspec.json.decode(meta["spec"], type=CampaignSpec)
    v = Verdict(campaign_id)
    v.unwritten = await drain(client, campaign_id, drain_timeout_s)
    if v.unwritten > 0:
        v.fail([f"the writer did not drain: {v.unwritten} grants unwritten after "
                f"{drain_timeout_s:g} s"])
    meta = await client.hgetall(keys.meta)
    v.total, v.granted = int(meta["total"]), int(meta.get("seq", 0))
    taken = v.total - int(meta["remaining"])
    if v.granted > v.total:
        v.fail([f"{v.granted} grants of a stock of {v.total} (with restocks)"])
    if taken != v.granted:
        v.fail([f"{taken} units taken from stock but {v.granted} grants made"])
    redis_counts: dict[str, dict[str, int]] = {}
    for name in ("users", "devices", "ips"):
        raw: Any = await client.hgetall(getattr(keys, name))
        redis_counts[name] = {k: int(n) for k, n in raw.items()}
    store = await open_store(store_url)
    try:
        rows = await store.claim_rows(campaign_id)
    finally:
        await store.close()
    v.stored = len(rows)
    if v.stored != v.granted:
        v.fail([f"the store has {v.stored} claims, Redis granted {v.granted}"])
    check_store(v, spec, rows, redis_counts)
    if records:
        check_clients(v, spec, records, rows, pii_key)
    return v


def render(v: Verdict, logs: bool) -> str:
    lines = [f"campaign {v.campaign_id}: stock {v.total} (with restocks), granted {v.granted}, "
             f"stored {v.stored}, unwritten {v.unwritten}"
             + (f", grants seen by clients {v.client_grants}" if logs else "")]
    if v.ok:
        lines.append("verdict: PASS")
    else:
        lines.append(f"verdict: FAIL, {len(v.violations)} violation(s):")
        lines += [f"  - {m}" for m in v.violations]
    return "\n".join(lines)


@click.command("verify")
@click.option("--campaign", "campaign_id", required=True)
@click.option("--grants", "grant_paths", multiple=True,
              type=click.Path(exists=True, path_type=Path),
              help="JSON-lines grant logs of the clients (files or directories of *.jsonl).")
@click.option("--drain-timeout", default=60.0, show_default=True,
              help="Seconds to wait for the writer to store every grant.")
def verify_command(campaign_id: str, grant_paths: tuple[Path, ...], drain_timeout: float) -> None:
    """Verify a campaign after a load test; exit 1 listing every violation."""
    from gateway.redis.client import redis_client

    settings = load_settings()
    if not settings.redis_url:
        raise click.UsageError("FLASHCLAIM_REDIS_URL is not set (or run `flashclaim run`)")
    records = read_records(grant_paths)

    async def go() -> Verdict:
        client = redis_client(settings)
        try:
            return await verify(client, settings.store_url, campaign_id, records,
                                pii_key=settings.signing_key, drain_timeout_s=drain_timeout)
        finally:
            await client.aclose()

    try:
        verdict = asyncio.run(go())
    except LookupError as e:
        raise click.ClickException(str(e)) from None
    click.echo(render(verdict, bool(grant_paths)))
    sys.exit(0 if verdict.ok else 1)

