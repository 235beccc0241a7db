"""gateway.domain: spec validation, outcomes, eligibility, grants and coupon codes, no Redis."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.domain import (
    LIMIT_KIND,
    CampaignSpec,
    Identity,
    Outcome,
    SpecError,
    build_grant,
    coupon_code,
    from_ms,
    ineligibility,
    keyed_hash,
    to_ms,
    validate_spec,
    verify_coupon_code,
)
from tests.conftest import spec as spec_doc

KEY = b"k" * 32
T0 = dt.datetime(2030, 1, 1, 12, tzinfo=dt.UTC)
CLAIM_LUA = Path(__file__).resolve().parent.parent / "lua" / "claim.lua"


def decode(**over: Any) -> CampaignSpec:
    """Decode a spec document the way the admin API does (JSON bytes -> CampaignSpec)."""
    return msgspec.json.decode(msgspec.json.encode(spec_doc(**over)), type=CampaignSpec)


def coupon(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"kind": "amount_off", "value": 500, "valid_days": 7}
    doc.update(over)
    return doc


def spec_error(**over: Any) -> SpecError:
    with pytest.raises(SpecError) as e:
        validate_spec(decode(**over))
    return e.value


# ---- validate_spec -------------------------------------------------------------------------

def test_good_spec_passes_unchanged() -> None:
    s = decode(id="spring-sale")
    assert validate_spec(s) == s


def test_missing_id_is_filled_with_a_slug() -> None:
    doc = spec_doc()
    del doc["id"]
    s = msgspec.json.decode(msgspec.json.encode(doc), type=CampaignSpec)
    a, b = validate_spec(s), validate_spec(s)
    assert a.id is not None and b.id is not None
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", a.id)
    assert a.id != b.id
    assert msgspec.structs.replace(a, id=None) == s


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"starts_at": T0.isoformat(), "ends_at": T0.isoformat()}, "ends_at"),
        ({"starts_at": T0.isoformat(),
          "ends_at": (T0 - dt.timedelta(seconds=1)).isoformat()}, "ends_at"),
        ({"starts_at": "2030-01-01T00:00:00"}, "starts_at"),
        ({"ends_at": "2030-01-01T00:00:00"}, "ends_at"),
        ({"coupons": [coupon(kind="percent_off", value=101)]}, "coupons[0].value"),
        ({"coupons": [coupon(), coupon(kind="threshold", value=3000, threshold=3000)]},
         "coupons[1].threshold"),
        ({"coupons": [coupon(kind="threshold", value=3000, threshold=2999)]},
         "coupons[0].threshold"),
        ({"coupons": [coupon(kind="threshold", value=3000)]}, "coupons[0].threshold"),
        ({"coupons": [coupon(valid_from=T0.isoformat())]}, "coupons[0].valid_days"),
        ({"coupons": [coupon(valid_until=T0.isoformat())]}, "coupons[0].valid_days"),
        ({"coupons": [coupon(valid_days=None)]}, "coupons[0].valid_days"),
        ({"coupons": [coupon(valid_days=None, valid_from=T0.isoformat())]},
         "coupons[0].valid_days"),
        ({"coupons": [coupon(valid_days=None, valid_from="2030-01-01T00:00:00",
                             valid_until="2030-02-01T00:00:00+00:00")]},
         "coupons[0].valid_from"),
        ({"coupons": [coupon(valid_days=None, valid_from="2030-01-01T00:00:00+00:00",
                             valid_until="2030-02-01T00:00:00")]},
         "coupons[0].valid_until"),
        ({"coupons": [coupon(valid_days=None, valid_from=T0.isoformat(),
                             valid_until=T0.isoformat())]}, "coupons[0].valid_until"),
        ({"coupons": [coupon(), coupon(valid_days=None, valid_from=T0.isoformat(),
                                       valid_until=(T0 - dt.timedelta(days=1)).isoformat())]},
         "coupons[1].valid_until"),
    ],
)
def test_spec_error_names_its_field(over: dict[str, Any], field: str) -> None:
    err = spec_error(**over)
    assert err.field == field
    assert f"`$.{field}`" in str(err)


def test_percent_off_of_100_and_fixed_validity_pass() -> None:
    s = decode(coupons=[
        coupon(kind="percent_off", value=100),
        coupon(valid_days=None, valid_from=T0.isoformat(),
               valid_until=(T0 + dt.timedelta(days=1)).isoformat()),
    ])
    assert validate_spec(s).coupons == s.coupons


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"bogus": 1}, "bogus"),
        ({"limits": {"per_user": 1, "per_tenant": 2}}, "per_tenant"),
        ({"coupons": [coupon(colour="red")]}, "colour"),
        ({"id": "Bad_Slug"}, "$.id"),
        ({"id": "-leading-dash"}, "$.id"),
        ({"id": "x" * 64}, "$.id"),
        ({"stock": 0}, "$.stock"),
        ({"stock": 1_000_000_001}, "$.stock"),
        ({"coupons": []}, "$.coupons"),
        ({"coupons": [coupon(kind="free_lunch")]}, "$.coupons[0].kind"),
        ({"coupons": [coupon(currency="cny")]}, "$.coupons[0].currency"),
        ({"limits": {"per_user": 0}}, "$.limits.per_user"),
    ],
)
def test_decode_rejects_with_the_field_named(over: dict[str, Any], needle: str) -> None:
    with pytest.raises(msgspec.ValidationError) as e:
        decode(**over)
    assert needle in str(e.value)


# ---- outcomes ------------------------------------------------------------------------------

def _lua_header_codes() -> dict[int, str]:
    """Outcome codes as documented in the header comment of lua/claim.lua."""
    header = []
    for line in CLAIM_LUA.read_text().splitlines():
        if not line.startswith("--"):
            break
        header.append(line.lstrip("-").strip())
    text = " ".join(header)
    assert "gateway.domain.Outcome:" in text, "claim.lua header should point at Outcome"
    text = text.split("gateway.domain.Outcome:", 1)[1]
    codes: dict[int, str] = {}
    m = re.search(r"(\d+)\.\.(\d+) limit ([a-z/]+)", text)
    assert m, text
    kinds = m.group(3).split("/")
    assert int(m.group(2)) - int(m.group(1)) + 1 == len(kinds)
    for n, kind in enumerate(kinds, start=int(m.group(1))):
        codes[n] = f"limit_{kind}"
    for n, name in re.findall(r"(?<![.\d])(\d+) ([a-z_]+)", text[: m.start()] + text[m.end():]):
        codes[int(n)] = name
    return codes


def test_outcome_values_match_claim_lua_header() -> None:
    documented = _lua_header_codes()
    assert documented == {o.value: o.name.lower() for o in Outcome}
    assert {o.value for o in Outcome} == set(range(1, len(Outcome) + 1))


def test_limit_kinds_cover_the_limit_outcomes() -> None:
    assert {o.name for o in LIMIT_KIND} == {f"LIMIT_{k.upper()}" for k in LIMIT_KIND.values()}
    assert set(LIMIT_KIND.values()) == {"user", "device", "phone", "ip", "subnet",
                                        "user_per_round"}


# ---- eligibility ---------------------------------------------------------------------------

def test_eligible_when_nothing_is_required() -> None:
    assert ineligibility(decode(), Identity("u1"), None) is None


def test_ineligible_for_missing_tags() -> None:
    s = decode(eligibility={"require_tags": ["vip", "kyc"]})
    why = ineligibility(s, Identity("u1", tags=frozenset({"vip"})), None)
    assert why is not None and "kyc" in why and "vip" not in why
    assert ineligibility(s, Identity("u1", tags=frozenset({"vip", "kyc", "x"})), None) is None


def test_ineligible_outside_regions() -> None:
    s = decode(eligibility={"regions": ["cn-sh", "cn-bj"]})
    assert ineligibility(s, Identity("u1", region="cn-sh"), None) is None
    assert ineligibility(s, Identity("u1", region="us-ny"), None) is not None
    assert ineligibility(s, Identity("u1"), None) is not None


def test_ineligible_on_other_channels() -> None:
    s = decode(eligibility={"channels": ["app"]})
    assert ineligibility(s, Identity("u1"), "app") is None
    assert ineligibility(s, Identity("u1"), "web") is not None
    assert ineligibility(s, Identity("u1"), None) is not None


def test_per_device_and_per_phone_need_the_identity_to_carry_them() -> None:
    dev = decode(limits={"per_user": 1, "per_device": 1})
    assert "device" in (ineligibility(dev, Identity("u1"), None) or "")
    assert ineligibility(dev, Identity("u1", device_h="d" * 32), None) is None
    phone = decode(limits={"per_user": 1, "per_phone": 1})
    assert "phone" in (ineligibility(phone, Identity("u1"), None) or "")
    assert ineligibility(phone, Identity("u1", phone_h="p" * 32), None) is None


# ---- hashing, time ---------------------------------------------------------------------------

def test_keyed_hash_is_stable_and_key_dependent() -> None:
    h = keyed_hash(KEY, "p:+8613800000000")
    assert h == keyed_hash(KEY, "p:+8613800000000")
    assert re.fullmatch(r"[0-9a-f]{32}", h)
    assert h != keyed_hash(b"other-key", "p:+8613800000000")
    assert h != keyed_hash(KEY, "p:+8613800000001")
    assert "8613800000000" not in h


@pytest.mark.parametrize("ms", [0, 1_700_000_000_123, 1_079_337_347_472, 2_183_226_373_411])
def test_milliseconds_round_trip_exactly(ms: int) -> None:
    assert from_ms(ms).tzinfo is not None
    assert to_ms(from_ms(ms)) == ms


# ---- grants and coupon codes ----------------------------------------------------------------

def test_grant_is_deterministic() -> None:
    s = validate_spec(decode(id="det", coupons=[coupon(), coupon(kind="percent_off", value=10)]))
    ms = to_ms(T0) + 123
    a, b = build_grant(KEY, s, "u1", 7, ms), build_grant(KEY, s, "u1", 7, ms)
    assert a == b
    assert msgspec.json.encode(a) == msgspec.json.encode(b)
    assert (a.claim_id, a.campaign_id, a.user_id, a.seq) == ("det.7", "det", "u1", 7)
    assert to_ms(a.granted_at) == ms
    assert [c.code for c in a.coupons] == [coupon_code(KEY, "det", 7, i, "u1") for i in (0, 1)]
    assert build_grant(KEY, s, "u1", 8, ms) != a
    assert build_grant(KEY, s, "u2", 7, ms).coupons[0].code != a.coupons[0].code


def test_relative_validity_counts_from_the_grant() -> None:
    s = validate_spec(decode(id="rel", coupons=[coupon(valid_days=30)]))
    ms = to_ms(T0)
    (c,) = build_grant(KEY, s, "u1", 1, ms).coupons
    assert c.valid_from == T0
    assert c.valid_until == T0 + dt.timedelta(days=30)
    (later,) = build_grant(KEY, s, "u1", 1, ms + 86_400_000).coupons
    assert later.valid_until == T0 + dt.timedelta(days=31)


def test_fixed_validity_is_copied() -> None:
    start, until = T0 + dt.timedelta(days=2), T0 + dt.timedelta(days=9)
    s = validate_spec(decode(id="fix", coupons=[
        coupon(kind="threshold", value=3000, threshold=10000, currency="EUR", valid_days=None,
               valid_from=start.isoformat(), valid_until=until.isoformat()),
    ]))
    (c,) = build_grant(KEY, s, "u1", 3, to_ms(T0)).coupons
    assert (c.valid_from, c.valid_until) == (start, until)
    assert (c.kind, c.value, c.threshold, c.currency) == ("threshold", 3000, 10000, "EUR")


def test_coupon_code_shape() -> None:
    code = coupon_code(KEY, "c1", 42, 3, "u1")
    assert re.fullmatch(r"42-3-[0-9A-F]{20}", code)
    assert code == coupon_code(KEY, "c1", 42, 3, "u1")


def test_codes_are_unique_across_seq_and_index() -> None:
    codes = {coupon_code(KEY, "c1", seq, i, "u1") for seq in range(1, 2001) for i in range(5)}
    assert len(codes) == 2000 * 5
    macs = {c.rsplit("-", 1)[1] for c in codes}
    assert len(macs) == len(codes)


def test_code_verifies_for_its_user_and_campaign_only() -> None:
    code = coupon_code(KEY, "c1", 42, 0, "u1")
    assert verify_coupon_code(KEY, "c1", "u1", code)
    assert not verify_coupon_code(KEY, "c1", "u2", code)
    assert not verify_coupon_code(KEY, "c2", "u1", code)
    assert not verify_coupon_code(b"another-key" * 3, "c1", "u1", code)


def test_tampered_codes_fail() -> None:
    code = coupon_code(KEY, "c1", 42, 0, "u1")
    seq, index, mac = code.split("-")
    flipped = ("B" if mac[0] == "A" else "A") + mac[1:]
    for bad in [
        f"{seq}-{index}-{flipped}",
        f"43-{index}-{mac}",
        f"{seq}-1-{mac}",
        f"{seq}-{index}-{mac[:-1]}",
        f"{seq}-{index}-{mac}A",
        f"{seq}-{index}-{mac.lower()}",
        f"0{seq}-{index}-{mac}",  # the same claim spelled twice must not verify twice
        f"{seq}-0{index}-{mac}",
        f"+{seq}-{index}-{mac}",
        f"{seq}-{index}-{mac}\n",
    ]:
        assert not verify_coupon_code(KEY, "c1", "u1", bad), bad


MAC = "A" * 20
GARBAGE = {
    "empty": "",
    "dash": "-",
    "dashes": "--",
    "seq-only": "42",
    "no-mac": "42-0",
    "empty-mac": "42-0-",
    "letters": "a-b-c",
    "four-parts": "42-0-ABC-DEF",
    "leading-space": f" 42-0-{MAC}",
    "negative": f"-1-0-{MAC}",
    "non-ascii-mac": "42-0-\u00e9",
    "fullwidth-digits": f"\uff14\uff12-0-{MAC}",
    "superscript-digit": f"\u00b2-0-{MAC}",
    "arabic-indic-digits": f"\u0664\u0662-0-{MAC}",
    "huge-seq": "9" * 5000 + f"-0-{MAC}",
}


@pytest.mark.parametrize("garbage", GARBAGE.values(), ids=GARBAGE.keys())
def test_garbage_codes_fail_without_raising(garbage: str) -> None:
    assert verify_coupon_code(KEY, "c1", "u1", garbage) is False


def test_non_ascii_digits_do_not_alias_a_real_code() -> None:
    code = coupon_code(KEY, "c1", 42, 0, "u1")
    _, _, mac = code.split("-")
    assert not verify_coupon_code(KEY, "c1", "u1", f"\u0664\u0662-0-{mac}")
    assert not verify_coupon_code(KEY, "c1", "u1", f"\uff14\uff12-\uff10-{mac}")


# ---- property: no spec, however odd, gets anything but the 422 answer ---------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=4),
    max_leaves=12,
)
plausible = (
    json_values
    | st.datetimes(timezones=st.none() | st.timezones()).map(lambda t: t.isoformat())
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from(["amount_off", "threshold", "percent_off", "CNY", "", "a-b", "X" * 300])
)


def _mutated(draw: st.DrawFn) -> Any:
    """A valid spec with some fields, at any depth, replaced or removed."""
    doc: dict[str, Any] = spec_doc(limits={"per_user": 1}, eligibility={"regions": ["cn"]},
                                   admission={"admit_per_s": 10, "burst": 5})
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        target: Any = doc
        path = draw(st.sampled_from([
            [], ["coupons", 0], ["limits"], ["eligibility"], ["admission"]]))
        for step in path:
            try:
                target = target[step]
            except (KeyError, IndexError, TypeError):
                target = None
        if not isinstance(target, dict):
            continue
        key = draw(st.sampled_from([*sorted(target), "extra", "valid_from", "valid_until",
                                    "valid_days", "waiting_room"]))
        if draw(st.booleans()) and key in target:
            del target[key]
        else:
            target[key] = draw(plausible)
    return doc


mutated_specs = st.composite(_mutated)()


@settings(max_examples=300, deadline=None)
@given(st.one_of(json_values, mutated_specs))
def test_any_json_spec_is_accepted_or_gets_422(doc: Any) -> None:
    from gateway.errors import Unprocessable
    from gateway.http.admin import meta_fields
    from gateway.http.body import decode
    from gateway.schemas import encoder, spec_decoder

    body = json.dumps(doc).encode()
    try:
        spec = validate_spec(decode(spec_decoder, body))
    except Unprocessable as e:
        assert e.status == 422 and e.extra.get("field", "").startswith("$")
        return
    except SpecError as e:
        assert e.field
        return
    # accepted: it can be stored and read back
    fields = meta_fields(spec)
    assert spec_decoder.decode(str(fields["spec"]).encode()) == spec
    assert encoder.encode(spec)
