"""The pure core: the campaign spec and its validation, claim outcomes, eligibility and
coupon codes. Values in, values out; no I/O, no aiohttp or redis imports."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import math
import re
import secrets
from enum import IntEnum
from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

Slug = Annotated[str, Meta(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$", description="lowercase slug")]
Label = Annotated[str, Meta(min_length=1, max_length=64)]
PositiveCount = Annotated[int, Meta(ge=1, le=1_000_000)]
Money = Annotated[int, Meta(ge=0, le=10**12, description="integer minor units")]

MAX_STOCK = 1_000_000_000
MAX_SHARDS = 64


class SpecError(ValueError):
    """A campaign spec that is well-formed but makes no sense; names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{message} - at `$.{field}`")
        self.field = field


class Limits(Struct, frozen=True, forbid_unknown_fields=True):
    per_user: PositiveCount = 1
    per_device: PositiveCount | None = None
    per_phone: PositiveCount | None = None
    per_ip: PositiveCount | None = None


class Eligibility(Struct, frozen=True, forbid_unknown_fields=True):
    require_tags: Annotated[list[Label], Meta(max_length=32)] = []
    regions: Annotated[list[Label], Meta(max_length=256)] = []
    channels: Annotated[list[Label], Meta(max_length=64)] = []


class CouponSpec(Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    kind: Literal["amount_off", "threshold", "percent_off"]
    value: Annotated[int, Meta(ge=1, le=10**12)]
    threshold: Money = 0
    currency: Annotated[str, Meta(pattern=r"^[A-Z]{3}$")] = "CNY"
    valid_days: Annotated[int, Meta(ge=1, le=3650)] | None = None
    valid_from: dt.datetime | None = None
    valid_until: dt.datetime | None = None


class Admission(Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """The campaign's admission rate, exact across gateways; `burst` defaults to one
    second's worth."""

    admit_per_s: Annotated[float, Meta(gt=0, le=1_000_000)] | None = None
    burst: Annotated[int, Meta(ge=1, le=1_000_000)] | None = None
    waiting_room: bool = False

    @property
    def bucket(self) -> tuple[float, int]:
        """(rate per second, burst); rate 0 means no admission limit."""
        if self.admit_per_s is None:
            return 0.0, 0
        return self.admit_per_s, self.burst or max(1, math.ceil(self.admit_per_s))


class CampaignSpec(Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """A campaign as the operator defines it (DESIGN §4)."""

    name: Annotated[str, Meta(min_length=1, max_length=200)]
    stock: Annotated[int, Meta(ge=1, le=MAX_STOCK)]
    starts_at: dt.datetime
    ends_at: dt.datetime
    coupons: Annotated[list[CouponSpec], Meta(min_length=1, max_length=20)]
    id: Slug | None = None
    limits: Limits = Limits()
    eligibility: Eligibility = Eligibility()
    admission: Admission | None = None
    # stock split over this many Redis hash slots (a hot campaign spread over cluster nodes)
    shards: Annotated[int, Meta(ge=1, le=MAX_SHARDS)] = 1


def face_value(spec: CampaignSpec) -> int:
    """What one grant costs the issuer, in minor units: the package's fixed-amount coupons
    (a percent_off coupon has no fixed face value and is not counted)."""
    return sum(c.value for c in spec.coupons if c.kind != "percent_off")


def _aware(field: str, value: dt.datetime) -> None:
    if value.tzinfo is None:
        raise SpecError(field, "Expected an RFC 3339 time with a UTC offset")


def validate_spec(spec: CampaignSpec) -> CampaignSpec:
    """Check what the types alone cannot; return the spec with an id filled in."""
    _aware("starts_at", spec.starts_at)
    _aware("ends_at", spec.ends_at)
    if spec.ends_at <= spec.starts_at:
        raise SpecError("ends_at", "Expected `ends_at` after `starts_at`")
    for i, c in enumerate(spec.coupons):
        at = f"coupons[{i}]"
        if c.kind == "percent_off" and c.value > 100:
            raise SpecError(f"{at}.value", "Expected a percentage between 1 and 100")
        if c.kind == "threshold" and c.threshold <= c.value:
            raise SpecError(f"{at}.threshold", "Expected `threshold` above `value`")
        fixed = c.valid_from is not None or c.valid_until is not None
        if c.valid_days is not None and fixed:
            raise SpecError(f"{at}.valid_days", "Give `valid_days` or `valid_from`/`valid_until`")
        if c.valid_days is None:
            if c.valid_from is None or c.valid_until is None:
                raise SpecError(f"{at}.valid_days", "Expected `valid_days` or both fixed bounds")
            _aware(f"{at}.valid_from", c.valid_from)
            _aware(f"{at}.valid_until", c.valid_until)
            if c.valid_until <= c.valid_from:
                raise SpecError(f"{at}.valid_until", "Expected `valid_until` after `valid_from`")
    if spec.admission is not None and spec.admission.waiting_room and (
            spec.admission.admit_per_s is None):
        raise SpecError("admission.admit_per_s", "A waiting room needs `admit_per_s`")
    if spec.shards > 1:
        _shardable(spec)
    if spec.id is None:
        spec = msgspec.structs.replace(spec, id=f"c-{secrets.token_hex(6)}")
    return spec


def _shardable(spec: CampaignSpec) -> None:
    """A sharded campaign keeps each user's records on the user's home shard, so only the
    per-user limit is exact; device, phone and address limits and the admission bucket
    would be counted per shard."""
    if spec.shards > spec.stock:
        raise SpecError("shards", "Expected no more shards than units of stock")
    lim = spec.limits
    for name in ("per_device", "per_phone", "per_ip"):
        if getattr(lim, name) is not None:
            raise SpecError(f"limits.{name}", "A sharded campaign limits per user only")
    if spec.admission is not None and not spec.admission.waiting_room and (
            spec.admission.admit_per_s is not None):
        raise SpecError("admission.admit_per_s",
                        "A sharded campaign paces admissions with a waiting room only")


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MS = dt.timedelta(milliseconds=1)


def to_ms(t: dt.datetime) -> int:
    # exact integer arithmetic: float timestamp() * 1000 truncates e.g. .411 to .410
    return (t - _EPOCH) // _MS


def from_ms(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)


class Outcome(IntEnum):
    """Result codes of lua/claim.lua, one per claim in a batch."""

    GRANTED = 1
    REPLAYED = 2  # an Idempotency-Key seen before: the original grant
    SOLD_OUT = 3
    LIMIT_USER = 4
    LIMIT_DEVICE = 5
    LIMIT_PHONE = 6
    LIMIT_IP = 7
    NOT_STARTED = 8
    ENDED = 9
    PAUSED = 10
    UNKNOWN = 11
    BACKLOG = 12  # the durable store is too far behind: shed
    ADMISSION = 13  # over the campaign's admission rate


LIMIT_KIND = {
    Outcome.LIMIT_USER: "user",
    Outcome.LIMIT_DEVICE: "device",
    Outcome.LIMIT_PHONE: "phone",
    Outcome.LIMIT_IP: "ip",
}


class Identity(Struct, frozen=True):
    """A verified caller. `phone_h` and `device_h` are keyed hashes, never the raw values."""

    user_id: str
    device_h: str = ""
    phone_h: str = ""
    tags: frozenset[str] = frozenset()
    region: str = ""


def ineligibility(spec: CampaignSpec, who: Identity, channel: str | None) -> str | None:
    """Why `who` may not claim in this campaign, or None when they may."""
    el = spec.eligibility
    missing = [t for t in el.require_tags if t not in who.tags]
    if missing:
        return f"requires tags: {', '.join(missing)}"
    if el.regions and who.region not in el.regions:
        return "not available in your region"
    if el.channels and channel not in el.channels:
        return "not available on this channel"
    lim = spec.limits
    if lim.per_device is not None and not who.device_h:
        return "this campaign needs a device id in the identity token"
    if lim.per_phone is not None and not who.phone_h:
        return "this campaign needs a phone number in the identity token"
    return None


def keyed_hash(key: bytes, value: str) -> str:
    """A stable pseudonym for PII (phone, device) so that raw values never leave the worker."""
    return hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:32]


# ---- grants and coupon codes -------------------------------------------------------------

class IssuedCoupon(Struct, frozen=True):
    code: str
    kind: str
    value: int
    threshold: int
    currency: str
    valid_from: dt.datetime
    valid_until: dt.datetime


class Grant(Struct, frozen=True):
    claim_id: str
    campaign_id: str
    user_id: str
    seq: int
    granted_at: dt.datetime
    coupons: list[IssuedCoupon]


def claim_id(campaign_id: str, seq: int) -> str:
    return f"{campaign_id}.{seq}"


def _mac(key: bytes, campaign_id: str, seq: int, index: int, user_id: str) -> str:
    msg = f"{campaign_id}\x00{seq}\x00{index}\x00{user_id}".encode()
    return hmac.digest(key, msg, "sha256")[:10].hex().upper()


def coupon_code(key: bytes, campaign_id: str, seq: int, index: int, user_id: str) -> str:
    """`<seq>-<index>-<20 hex digits of HMAC>`: unique by (seq, index), bound to the user,
    unforgeable without the key (80 bits)."""
    return f"{seq}-{index}-{_mac(key, campaign_id, seq, index, user_id)}"


# the canonical form only (ASCII digits, no leading zeros), so one coupon has one spelling
_CODE = re.compile(r"(0|[1-9][0-9]{0,17})-(0|[1-9][0-9]{0,3})-([0-9A-F]{20})", re.ASCII)


def verify_coupon_code(key: bytes, campaign_id: str, user_id: str, code: str) -> bool:
    """True when `code` was issued by this campaign to this user."""
    m = _CODE.fullmatch(code)
    if m is None:
        return False
    expected = _mac(key, campaign_id, int(m[1]), int(m[2]), user_id)
    return hmac.compare_digest(expected, m[3])


def build_grant(
    key: bytes, spec: CampaignSpec, user_id: str, seq: int, granted_ms: int
) -> Grant:
    """The grant for claim number `seq`; deterministic, so a replay returns the same body."""
    assert spec.id is not None
    granted_at = from_ms(granted_ms)
    coupons = []
    for i, c in enumerate(spec.coupons):
        if c.valid_days is not None:
            start, until = granted_at, granted_at + dt.timedelta(days=c.valid_days)
        else:
            assert c.valid_from is not None and c.valid_until is not None
            start, until = c.valid_from, c.valid_until
        coupons.append(
            IssuedCoupon(
                code=coupon_code(key, spec.id, seq, i, user_id),
                kind=c.kind,
                value=c.value,
                threshold=c.threshold,
                currency=c.currency,
                valid_from=start,
                valid_until=until,
            )
        )
    return Grant(claim_id(spec.id, seq), spec.id, user_id, seq, granted_at, coupons)
