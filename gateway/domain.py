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
from typing import Annotated, Any, Literal, NamedTuple

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
    # grants per network: an IPv4 /24 or an IPv6 /48 (one site's allocation), see peer.subnet
    per_subnet: PositiveCount | None = None
    per_user_per_round: PositiveCount | None = None  # campaigns with `rounds` only


PERIODS = {"hourly": 3600, "daily": 86_400, "weekly": 7 * 86_400}
Seconds = Annotated[int, Meta(ge=1, le=366 * 86_400)]


class Rounds(Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """Rolling drops: `count` rounds of `stock` units, one every `every` seconds (or a
    period) from `starts_at`. A round stays open until the next drop, or `open_s` seconds
    after its own; `carry_over` adds a round's leftover to the next one, else it lapses."""

    every: Seconds | Literal["hourly", "daily", "weekly"]
    count: Annotated[int, Meta(ge=1, le=10_000)]
    stock: Annotated[int, Meta(ge=1, le=MAX_STOCK)]
    carry_over: bool = False
    open_s: Seconds | None = None

    @property
    def every_ms(self) -> int:
        return 1000 * (PERIODS[self.every] if isinstance(self.every, str) else self.every)

    @property
    def open_ms(self) -> int:
        """How long a round stays open; 0: until the next drop."""
        return 0 if self.open_s is None else self.open_s * 1000


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


class AntiBot(Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """A proof a claim must carry (403 `proof_required` without it): a tag the identity
    token carries (set by the app's challenge), and/or a proof of work: a `Proof-Of-Work`
    header with a nonce such that sha256("<campaign>:<user>:<nonce>") starts with
    `pow_bits` zero bits (2**pow_bits hashes on average for the caller, one to check)."""

    tag: Label | None = None
    pow_bits: Annotated[int, Meta(ge=1, le=32)] | None = None


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
    antibot: AntiBot | None = None
    # the most face value the campaign may grant, minor units; stock is cut to fit it
    budget_cap: Annotated[int, Meta(ge=1, le=10**15)] | None = None
    rounds: Rounds | None = None
    redemption_codes: bool = False  # each claim needs a one-time code from the operator
    # stock split over this many Redis hash slots (a hot campaign spread over cluster nodes)
    shards: Annotated[int, Meta(ge=1, le=MAX_SHARDS)] = 1


def face_value(spec: CampaignSpec) -> int:
    """What one grant costs the issuer, in minor units: the package's fixed-amount coupons
    (a percent_off coupon has no fixed face value and is not counted)."""
    return sum(c.value for c in spec.coupons if c.kind != "percent_off")


def budget_units(spec: CampaignSpec) -> int | None:
    """How many grants the budget cap pays for (every grant has the same face value, so
    issued value + this grant's value <= cap is exactly units <= cap // face); None when
    the campaign has no cap."""
    if spec.budget_cap is None:
        return None
    return spec.budget_cap // face_value(spec)


def effective_stock(spec: CampaignSpec) -> int:
    """The units a campaign puts up: its stock, cut to what the budget cap pays for."""
    units = budget_units(spec)
    return spec.stock if units is None else min(spec.stock, units)


def validity_template(spec: CampaignSpec) -> str:
    """Each coupon's validity for lua/claim.lua to stamp on the claim event, in package
    order: `from/until` in ms, `@` standing for the grant time and `+N` for N ms after it."""
    parts = []
    for c in spec.coupons:
        if c.valid_days is not None:
            parts.append(f"@/+{c.valid_days * 86_400_000}")
        else:
            assert c.valid_from is not None and c.valid_until is not None
            parts.append(f"{to_ms(c.valid_from)}/{to_ms(c.valid_until)}")
    return ",".join(parts)


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
    if spec.budget_cap is not None:
        if face_value(spec) == 0:
            raise SpecError("budget_cap", "A budget cap needs a coupon with a fixed face value")
        if spec.budget_cap < face_value(spec):
            raise SpecError("budget_cap", "Expected at least one grant's face value")
    if spec.admission is not None and spec.admission.waiting_room and (
            spec.admission.admit_per_s is None):
        raise SpecError("admission.admit_per_s", "A waiting room needs `admit_per_s`")
    if spec.antibot is not None and spec.antibot.tag is None and spec.antibot.pow_bits is None:
        raise SpecError("antibot", "Expected `tag` or `pow_bits`")
    _check_rounds(spec)
    if spec.shards > 1:
        _shardable(spec)
    if spec.id is None:
        spec = msgspec.structs.replace(spec, id=f"c-{secrets.token_hex(6)}")
    return spec


def _check_rounds(spec: CampaignSpec) -> None:
    r = spec.rounds
    if r is None:
        if spec.limits.per_user_per_round is not None:
            raise SpecError("limits.per_user_per_round", "Only a campaign with `rounds` has it")
        return
    if spec.stock != r.count * r.stock:
        raise SpecError("stock", f"Expected `stock` = rounds.count * rounds.stock = "
                        f"{r.count * r.stock}")
    last_drop = spec.starts_at + dt.timedelta(milliseconds=(r.count - 1) * r.every_ms)
    if last_drop >= spec.ends_at:
        raise SpecError("rounds.count", f"The last drop ({last_drop.isoformat()}) is not "
                        "before `ends_at`")
    if r.open_ms > r.every_ms:
        raise SpecError("rounds.open_s", "Expected `open_s` no longer than `every`")
    if spec.admission is not None and spec.admission.waiting_room:
        raise SpecError("admission.waiting_room", "A campaign with `rounds` has no waiting room")


class RoundPosition(NamedTuple):
    """Where Redis's clock stands in a campaign's rounds (see lua/claim.lua, which decides
    the same on Redis TIME)."""

    idx: int  # the current round, 0-based (the last one after the last drop)
    opens_ms: int  # its drop
    next_ms: int | None  # the next drop; None after the last
    open: bool  # inside the round's open window


def round_at(rounds: Rounds, starts_ms: int, now_ms: int) -> RoundPosition:
    every = rounds.every_ms
    index = min(max(0, (now_ms - starts_ms) // every), rounds.count - 1)
    opens = starts_ms + index * every
    nxt = opens + every if index < rounds.count - 1 else None
    is_open = now_ms >= opens and (rounds.open_ms == 0 or now_ms < opens + rounds.open_ms)
    return RoundPosition(index, opens, nxt, is_open)


def round_left(rounds: Rounds, index: int, left: int, now_index: int) -> int:
    """Units of round `now_index`, when round `index` was left with `left`: with carry-over
    every round in between adds its stock to the leftover, else the newest round starts
    afresh (the same roll-forward lua/claim.lua does)."""
    if now_index <= index:
        return left
    if rounds.carry_over:
        return left + (now_index - index) * rounds.stock
    return rounds.stock


# ---- live changes -------------------------------------------------------------------------

LIVE_FIELDS = ("limits", "eligibility", "admission")  # what may change during a campaign


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON merge patch: objects merge key by key, `null` removes, the rest
    replaces."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def patched_spec(spec: CampaignSpec, patch: dict[str, Any]) -> CampaignSpec:
    """`spec` with a merge patch of its live fields applied and validated like a new spec.
    Raises SpecError (a field that cannot change live, or a bad combination) or
    msgspec.ValidationError (a field of the wrong shape)."""
    for key in patch:
        if key not in LIVE_FIELDS:
            raise SpecError(key, f"`{key}` cannot change during a campaign; only "
                            + ", ".join(f"`{f}`" for f in LIVE_FIELDS) + " can")
    merged = merge_patch(msgspec.to_builtins(spec), patch)
    return validate_spec(msgspec.convert(merged, CampaignSpec))


def _shardable(spec: CampaignSpec) -> None:
    """A sharded campaign keeps each user's records on the user's home shard, so only the
    per-user limit is exact; device, phone and address limits and the admission bucket
    would be counted per shard."""
    if spec.shards > spec.stock:
        raise SpecError("shards", "Expected no more shards than units of stock")
    lim = spec.limits
    for name in ("per_device", "per_phone", "per_ip", "per_subnet", "per_user_per_round"):
        if getattr(lim, name) is not None:
            raise SpecError(f"limits.{name}", "A sharded campaign limits per user only")
    # rounds, code batches and budget caps live in one meta hash; shards would each need
    # their own share of them
    for name in ("rounds", "budget_cap"):
        if getattr(spec, name) is not None:
            raise SpecError(name, "A sharded campaign has no " + name)
    if spec.redemption_codes:
        raise SpecError("redemption_codes", "A sharded campaign has no redemption codes")
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
    LIMIT_SUBNET = 14  # the caller's /24 (IPv4) or /48 (IPv6) has its grants
    LIMIT_USER_PER_ROUND = 15  # the user's limit in this round (rounds campaigns)
    BAD_CODE = 16  # a redemption code that is not (or no longer) in the campaign's batch
    CODE_ATTEMPTS = 17  # too many wrong codes from this user this minute


LIMIT_KIND = {
    Outcome.LIMIT_USER: "user",
    Outcome.LIMIT_DEVICE: "device",
    Outcome.LIMIT_PHONE: "phone",
    Outcome.LIMIT_IP: "ip",
    Outcome.LIMIT_SUBNET: "subnet",
    Outcome.LIMIT_USER_PER_ROUND: "user_per_round",
}


class Identity(Struct, frozen=True, gc=False):
    """A verified caller. `phone_h` and `device_h` are keyed hashes, never the raw values.
    Never tracked by the garbage collector (`gc=False`: strings and a frozenset of strings
    make no cycle): a worker caches up to 100,000 of them, and a tracked cache made every
    full collection walk it, a pause of tens of ms while tokens pour in."""

    user_id: str
    device_h: str = ""
    phone_h: str = ""
    tags: frozenset[str] = frozenset()
    region: str = ""


def ineligibility(spec: CampaignSpec, who: Identity, channel: str | None) -> str | None:
    """Why `who` may not claim in this campaign, or None when they may."""
    el = spec.eligibility
    if el.require_tags:
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


POW_NONCE_MAX = 64


def proof_of_work_ok(campaign_id: str, user_id: str, nonce: str | None, bits: int) -> bool:
    """True when sha256("<campaign>:<user>:<nonce>") starts with `bits` zero bits."""
    if not nonce or len(nonce) > POW_NONCE_MAX:
        return False
    digest = hashlib.sha256(f"{campaign_id}:{user_id}:{nonce}".encode()).digest()
    return int.from_bytes(digest[:4]) >> (32 - bits) == 0


def missing_proof(spec: CampaignSpec, who: Identity, pow_nonce: str | None) -> str | None:
    """Why the claim lacks the campaign's anti-bot proof, or None when it has it."""
    ab = spec.antibot
    if ab is None:
        return None
    if ab.tag is not None and ab.tag not in who.tags:
        return f"the identity token must carry the `{ab.tag}` tag (pass the app's challenge)"
    assert spec.id is not None
    if ab.pow_bits is not None and not proof_of_work_ok(spec.id, who.user_id, pow_nonce,
                                                        ab.pow_bits):
        return (f"a `Proof-Of-Work` header is required: a nonce such that "
                f"sha256(\"{spec.id}:<user id>:<nonce>\") starts with {ab.pow_bits} zero bits")
    return None


def keyed_hash(key: bytes, value: str) -> str:
    """A stable pseudonym for PII (phone, device) so that raw values never leave the worker."""
    return hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:32]


def device_hash(key: bytes, device_id: str) -> str:
    """The one pseudonym of a device id: in claims, counters, blocklists and the store."""
    return keyed_hash(key, "d:" + device_id)


def phone_hash(key: bytes, phone: str) -> str:
    return keyed_hash(key, "p:" + phone)


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
