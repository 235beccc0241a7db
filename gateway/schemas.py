"""Wire types: requests, responses and problem documents, with codecs built once."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

from gateway.domain import (
    Admission,
    CampaignSpec,
    CouponSpec,
    Eligibility,
    Grant,
    Limits,
    Rounds,
    face_value,
)


class ClaimRequest(Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    channel: Annotated[str, Meta(min_length=1, max_length=64)] | None = None
    code: Annotated[str, Meta(min_length=1, max_length=128)] | None = None


class RestockRequest(Struct, frozen=True, forbid_unknown_fields=True):
    quantity: Annotated[int, Meta(ge=1, le=1_000_000_000)]


class ProblemDocument(Struct, omit_defaults=True):
    """RFC 9457 problem details; `code` is the short machine word."""

    type: str
    title: str
    status: int
    detail: str
    code: str
    instance: str | None = None
    request_id: str | None = None
    claims: list[str] | None = None  # limit_reached: the caller's claim ids
    limit: str | None = None  # limit_reached: user | device | phone | ip
    field: str | None = None  # invalid: where in the body
    retry_after_s: int | None = None
    next_round_at: dt.datetime | None = None  # rounds: when the next drop comes


class ClaimList(Struct):
    claims: list[Grant]


class Budget(Struct, omit_defaults=True):
    """A campaign's face value in minor units: per grant, put up (stock x face), granted."""

    face_value: int
    issued: int
    used: int
    remaining: int
    cap: int | None = None

    @classmethod
    def of(cls, spec: CampaignSpec, stock: int, claimed: int) -> Budget:
        face = face_value(spec)
        return cls(face, stock * face, claimed * face, (stock - claimed) * face,
                   spec.budget_cap)
class RoundInfo(Struct):
    """The current round of a campaign with rounds, on Redis's clock."""

    index: int  # 0-based
    remaining: int  # units left in this round
    opened_at: dt.datetime
    next_at: dt.datetime | None  # the next drop; null after the last


class CampaignInfo(Struct, omit_defaults=True):
    """A campaign's spec with its live numbers."""

    id: str
    name: str
    status: str
    stock: int  # units ever put up: initial stock plus restocks
    remaining: int
    claimed: int  # grants so far
    starts_at: dt.datetime
    ends_at: dt.datetime
    limits: Limits
    eligibility: Eligibility
    coupons: list[CouponSpec]
    admission: Admission | None = None
    budget: Budget | None = None
    rounds: Rounds | None = None
    round: RoundInfo | None = None
    redemption_codes: bool = False
    shards: int = 1


class LiveFields(Struct, omit_defaults=True):
    """The parts of a campaign that may change while it runs."""

    limits: Limits
    eligibility: Eligibility
    admission: Admission | None = None


class CampaignPatch(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """`PATCH /v1/campaigns/{id}`, a JSON merge patch (RFC 7396): the fields given replace
    or merge into the running spec, `null` removes an optional one, the rest stays."""

    limits: Limits | None = None
    eligibility: Eligibility | None = None
    admission: Admission | None = None


class LiveChange(Struct):
    """What a live change did: the fields before and after, the campaign's new meta
    version, and `seq`, the number of grants decided before the change took effect."""

    campaign_id: str
    version: int
    seq: int
    before: LiveFields
    after: LiveFields


class CodesRequest(Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """`POST /v1/campaigns/{id}/codes`: generate `generate` new codes, or add the codes in
    `import` (6-64 letters and digits; case, dashes and spaces do not count)."""

    generate: Annotated[int, Meta(ge=1, le=100_000)] | None = None
    import_: Annotated[list[Annotated[str, Meta(max_length=80)]],
                       Meta(min_length=1, max_length=100_000)] | None = msgspec.field(
        default=None, name="import")


class CodesAdded(Struct, omit_defaults=True):
    """What a batch added. `codes` (generated batches only) is shown this once: Redis keeps
    only keyed hashes."""

    campaign_id: str
    added: int
    duplicates: int  # already in the batch (or twice in this request)
    available: int  # codes not yet used
    codes: list[str] | None = None


class CodesInfo(Struct):
    campaign_id: str
    available: int


class CampaignList(Struct):
    campaigns: list[CampaignInfo]


class BlockRequest(Struct, frozen=True, forbid_unknown_fields=True):
    """An entry for a blocklist: a user id, a device id (raw, hashed here; or already the
    keyed hash the anomaly view shows, with `hashed`), or an address/CIDR."""

    value: Annotated[str, Meta(min_length=1, max_length=128)]
    reason: Annotated[str, Meta(max_length=500)] = ""
    hashed: bool = False


class BlockEntry(Struct):
    kind: str
    value: str  # devices: the keyed hash, never the raw id
    reason: str = ""
    at: dt.datetime | None = None


class BlockList(Struct):
    kind: str
    entries: list[BlockEntry]


class Health(Struct):
    status: str


encoder = msgspec.json.Encoder()
claim_request_decoder = msgspec.json.Decoder(ClaimRequest)
restock_decoder = msgspec.json.Decoder(RestockRequest)
admission_decoder = msgspec.json.Decoder(Admission)
spec_decoder = msgspec.json.Decoder(CampaignSpec)
block_decoder = msgspec.json.Decoder(BlockRequest)
patch_decoder = msgspec.json.Decoder(dict[str, Any])
codes_decoder = msgspec.json.Decoder(CodesRequest)
