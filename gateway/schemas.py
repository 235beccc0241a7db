"""Wire types: requests, responses and problem documents, with codecs built once."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

import msgspec
from msgspec import Meta, Struct

from gateway.domain import Admission, CampaignSpec, CouponSpec, Eligibility, Grant, Limits


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


class ClaimList(Struct):
    claims: list[Grant]


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
    shards: int = 1


class CampaignList(Struct):
    campaigns: list[CampaignInfo]


class Health(Struct):
    status: str


encoder = msgspec.json.Encoder()
claim_request_decoder = msgspec.json.Decoder(ClaimRequest)
restock_decoder = msgspec.json.Decoder(RestockRequest)
admission_decoder = msgspec.json.Decoder(Admission)
spec_decoder = msgspec.json.Decoder(CampaignSpec)
