"""A campaign's report, built from values: the live numbers from Redis, what the durable
store holds (claim rate over time, channels, regions) and the claim answers counted by the
gateway's metrics; rendered as JSON or as a long-format CSV (section, key, value)."""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Iterable, Mapping

from msgspec import Struct

from gateway.domain import CampaignSpec, from_ms
from gateway.durable.store import StoreReport
from gateway.schemas import Budget

GRANTED = "granted"


class RateBucket(Struct):
    at: dt.datetime  # the bucket's start
    claims: int
    per_s: float


class ClaimRate(Struct):
    bucket_s: int
    peak_per_s: float  # the busiest bucket's grants per second
    mean_per_s: float  # grants per second from the first bucket with grants to the last
    buckets: list[RateBucket]


class Report(Struct):
    campaign_id: str
    name: str
    status: str
    generated_at: dt.datetime
    starts_at: dt.datetime
    ends_at: dt.datetime
    issued: int  # units put up: stock (cut to the budget cap) plus restocks
    claimed: int  # grants, from Redis
    remaining: int
    stored: int  # grants in the durable store; below `claimed` while the writer catches up
    first_claim_at: dt.datetime | None
    last_claim_at: dt.datetime | None
    sold_out: bool
    time_to_sell_out_s: float | None  # from the opening to the last unit's grant
    claim_rate: ClaimRate
    rejections: dict[str, int]  # problem code -> answers, as counted by this gateway
    by_channel: dict[str, int]
    by_region: dict[str, int]
    budget: Budget


class Live(Struct, frozen=True):
    """The campaign's numbers in Redis."""

    id: str
    spec: CampaignSpec
    status: str
    total: int
    remaining: int
    claimed: int
    opened_ms: int  # the later of starts_at and the campaign's creation


def claim_answers(samples: Iterable[tuple[Mapping[str, str], float]],
                  campaign_id: str) -> dict[str, int]:
    """flashclaim_claims_total samples (labels, value) of one campaign, by outcome."""
    out: dict[str, int] = {}
    for labels, value in samples:
        if labels.get("campaign") == campaign_id:
            outcome = labels.get("outcome", "")
            out[outcome] = out.get(outcome, 0) + int(value)
    return out


def build_report(live: Live, store: StoreReport, answers: Mapping[str, int], bucket_s: int,
                 now: dt.datetime) -> Report:
    spec = live.spec
    buckets = [RateBucket(dt.datetime.fromtimestamp(b, dt.UTC), n, round(n / bucket_s, 3))
               for b, n in store.buckets]
    # over whole buckets, like the peak, so that the mean never exceeds it
    span_s = store.buckets[-1][0] - store.buckets[0][0] + bucket_s if store.buckets else 0
    mean = store.stored / span_s if span_s else 0.0
    rate = ClaimRate(bucket_s, max((b.per_s for b in buckets), default=0.0), round(mean, 3),
                     buckets)
    remaining = max(live.remaining, 0)
    sold_out = remaining == 0 and live.claimed > 0
    # the last unit's grant is in the store only once the writer has caught up
    complete = sold_out and store.stored >= live.claimed and store.last_ms is not None
    sell_out_s = ((store.last_ms or 0) - live.opened_ms) / 1000 if complete else None
    return Report(
        campaign_id=live.id, name=spec.name, status=live.status, generated_at=now,
        starts_at=spec.starts_at, ends_at=spec.ends_at,
        issued=live.total, claimed=live.claimed, remaining=remaining, stored=store.stored,
        first_claim_at=None if store.first_ms is None else from_ms(store.first_ms),
        last_claim_at=None if store.last_ms is None else from_ms(store.last_ms),
        sold_out=sold_out,
        time_to_sell_out_s=None if sell_out_s is None else max(sell_out_s, 0.0),
        claim_rate=rate,
        rejections={k: v for k, v in sorted(answers.items()) if k != GRANTED},
        by_channel=dict(sorted(store.by_channel.items())),
        by_region=dict(sorted(store.by_region.items())),
        budget=Budget.of(spec, live.total, live.claimed),
    )


def _when(t: dt.datetime | None) -> str:
    return "" if t is None else t.isoformat().replace("+00:00", "Z")


def render_csv(r: Report) -> str:
    """One row per figure: `section,key,value`; spreadsheets pivot it as they like."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["section", "key", "value"])
    summary: list[tuple[str, object]] = [
        ("campaign_id", r.campaign_id), ("name", r.name), ("status", r.status),
        ("generated_at", _when(r.generated_at)), ("starts_at", _when(r.starts_at)),
        ("ends_at", _when(r.ends_at)), ("issued", r.issued), ("claimed", r.claimed),
        ("remaining", r.remaining), ("stored", r.stored),
        ("first_claim_at", _when(r.first_claim_at)), ("last_claim_at", _when(r.last_claim_at)),
        ("sold_out", str(r.sold_out).lower()),
        ("time_to_sell_out_s", "" if r.time_to_sell_out_s is None else r.time_to_sell_out_s),
        ("claim_rate_bucket_s", r.claim_rate.bucket_s),
        ("claim_rate_peak_per_s", r.claim_rate.peak_per_s),
        ("claim_rate_mean_per_s", r.claim_rate.mean_per_s),
        ("budget_face_value", r.budget.face_value), ("budget_issued", r.budget.issued),
        ("budget_used", r.budget.used), ("budget_remaining", r.budget.remaining),
        ("budget_cap", "" if r.budget.cap is None else r.budget.cap),
    ]
    w.writerows(("summary", k, v) for k, v in summary)
    w.writerows(("claims_per_bucket", _when(b.at), b.claims) for b in r.claim_rate.buckets)
    w.writerows(("rejections", k, v) for k, v in r.rejections.items())
    w.writerows(("channel", k, v) for k, v in r.by_channel.items())
    w.writerows(("region", k, v) for k, v in r.by_region.items())
    return buf.getvalue()
