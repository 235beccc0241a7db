"""Bad input of every kind gets the right 4xx RFC 9457 problem document and leaves Redis as is."""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt
import pytest

from tests.conftest import campaign_id, create_campaign, spec
from tests.servers import Gateway, RedisServer

CAP = 16 * 1024
PROBLEM_FIELDS = ("type", "title", "status", "detail", "code")


@dataclass
class Answer:
    status: int
    content_type: str
    body: Any
    headers: Any


async def send(
    http: aiohttp.ClientSession, method: str, url: str, *,
    data: Any = None, headers: dict[str, str] | None = None,
) -> Answer:
    async with http.request(method, url, data=data, headers=headers) as r:
        return Answer(r.status, r.content_type, await r.json(content_type=None), r.headers)


def assert_problem(a: Answer, status: int, code: str, names: str | None = None) -> None:
    """`a` is a problem document with this status and code; `names` appears in its
    `field` member or its detail when given."""
    assert a.status < 500, a.body
    assert (a.status, a.body.get("code")) == (status, code), a.body
    assert a.content_type == "application/problem+json"
    assert all(k in a.body for k in PROBLEM_FIELDS), a.body
    assert a.body["status"] == status
    assert all(isinstance(a.body[k], str) and a.body[k] for k in ("type", "title", "detail"))
    assert a.headers.get("X-Request-Id"), dict(a.headers)
    if names is not None and names.startswith("$"):
        assert a.body.get("field") == names, a.body
    elif names is not None:  # a bare name: msgspec reports unknown/missing ones at `$`
        assert names in f"{a.body.get('field')} {a.body['detail']}", a.body


@pytest.fixture(autouse=True)
def no_unexpected_errors(gateway: Gateway) -> Iterator[None]:
    """No request of a test here may reach the gateway's 500 path."""
    log = gateway.dir / "gateway.log"
    start = log.stat().st_size if log.exists() else 0
    yield
    with log.open("rb") as f:
        f.seek(start)
        added = f.read().decode(errors="replace")
    assert "unexpected error" not in added and "Traceback" not in added, added


@pytest.fixture
async def live(http: aiohttp.ClientSession, gateway: Gateway) -> str:
    return str((await create_campaign(http, gateway))["id"])


@pytest.fixture
async def fresh() -> AsyncIterator[aiohttp.ClientSession]:
    """A new connection per request, so requests spread over the gateway's workers."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        yield s


Bad = Callable[..., Awaitable[Answer]]


@pytest.fixture
def bad(http: aiohttp.ClientSession, redis_server: RedisServer) -> Bad:
    """Sends a request that must leave Redis exactly as it was (DEBUG DIGEST)."""
    async def go(method: str, url: str, *, data: Any = None,
                 headers: dict[str, str] | None = None,
                 via: aiohttp.ClientSession | None = None) -> Answer:
        before = redis_server.digest()
        a = await send(via or http, method, url, data=data, headers=headers)
        assert redis_server.digest() == before, f"Redis state changed by {a.status} {a.body}"
        return a
    return go


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def claims_url(gw: Gateway, cid: str) -> str:
    return f"{gw.base}/v1/campaigns/{cid}/claims"


# ---- claim bodies ------------------------------------------------------------------------

@pytest.mark.parametrize(("body", "status", "code", "names"), [
    (b'{"channel": ', 400, "malformed_json", None),
    (b"not json", 400, "malformed_json", None),
    (b'{"channel": "app",}', 400, "malformed_json", None),
    (b"\xff\xfe{}", 400, "malformed_json", None),
    (b'{"channel": 5}', 422, "invalid", "$.channel"),
    (b'{"channel": ""}', 422, "invalid", "$.channel"),
    (b'{"channel": "' + b"a" * 65 + b'"}', 422, "invalid", "$.channel"),
    (b'{"channel": 1e999}', 422, "invalid", "$.channel"),
    (b'{"code": ["x"]}', 422, "invalid", "$.code"),
    (b'{"unknown": 1}', 422, "invalid", "unknown"),
    (b'["app"]', 422, "invalid", None),
    (b'"app"', 422, "invalid", None),
    (b"null", 422, "invalid", None),
    (b"[" * 5000 + b"]" * 5000, 422, "invalid", None),
])
async def test_claim_body(
    bad: Bad, gateway: Gateway, live: str,
    body: bytes, status: int, code: str, names: str | None,
) -> None:
    h = bearer(gateway.token("body-user"))
    a = await bad("POST", claims_url(gateway, live), data=body, headers=h)
    assert_problem(a, status, code, names)


async def test_body_over_cap_with_length(bad: Bad, gateway: Gateway, live: str) -> None:
    h = bearer(gateway.token("big-user"))
    for size in (CAP + 1, 4 * CAP):
        body = b'{"channel": "' + b"a" * (size - 15) + b'"}'
        assert len(body) == size
        a = await bad("POST", claims_url(gateway, live), data=body, headers=h)
        assert_problem(a, 413, "too_large")
    # At the cap it is read and judged on its shape (the channel is too long), not its size.
    body = b'{"channel": "' + b"a" * (CAP - 15) + b'"}'
    a = await bad("POST", claims_url(gateway, live), data=body, headers=h)
    assert_problem(a, 422, "invalid", "$.channel")


async def test_body_over_cap_chunked(
    http: aiohttp.ClientSession, gateway: Gateway, redis_server: RedisServer, live: str,
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for part in (b'{"channel": "', *[b"a" * 4096] * 5, b'"}'):
            yield part

    h = bearer(gateway.token("chunked-user"))
    before = redis_server.digest()
    async with http.post(claims_url(gateway, live), data=chunks(), headers=h) as r:
        sent = r.request_info.headers
        assert sent.get("Transfer-Encoding") == "chunked" and "Content-Length" not in sent
        a = Answer(r.status, r.content_type, await r.json(content_type=None), r.headers)
    assert_problem(a, 413, "too_large")
    assert redis_server.digest() == before


# ---- identity tokens ---------------------------------------------------------------------

def _signed(key: str, alg: str = "HS256", **claims: Any) -> dict[str, str]:
    """A token with `sub` and `exp` unless overridden; a claim set to None is left out."""
    payload = {"sub": "u", "exp": int(time.time()) + 600, **claims}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HS512 finds the development secret short
        token = jwt.encode({k: v for k, v in payload.items() if v is not None}, key, alg)
    return bearer(token)


TOKENS: dict[str, Callable[[Gateway], dict[str, str]]] = {
    "missing": lambda gw: {},
    "not bearer": lambda gw: {"Authorization": "Basic dTpw"},
    "empty bearer": lambda gw: {"Authorization": "Bearer "},
    "garbage": lambda gw: bearer("not.a.jwt"),
    "forged": lambda gw: _signed("another-secret-" + "x" * 20),
    "expired": lambda gw: bearer(gw.token("u", ttl_s=-120)),
    "no exp": lambda gw: _signed(gw.identity_secret, exp=None),
    "no sub": lambda gw: _signed(gw.identity_secret, sub=None),
    "empty sub": lambda gw: _signed(gw.identity_secret, sub=""),
    "sub of 129": lambda gw: bearer(gw.token("x" * 129)),
    "alg none": lambda gw: _signed("", "none"),
    "HS512 with the secret": lambda gw: _signed(gw.identity_secret, "HS512"),
    "tags not a list": lambda gw: _signed(gw.identity_secret, tags="verified"),
}


@pytest.mark.parametrize("kind", list(TOKENS))
async def test_bad_token(bad: Bad, gateway: Gateway, live: str, kind: str) -> None:
    h = TOKENS[kind](gateway)
    a = await bad("POST", claims_url(gateway, live), data=b"{}", headers=h)
    assert_problem(a, 401, "unauthorized")
    mine = await bad("GET", claims_url(gateway, live) + "/mine", headers=h)
    assert_problem(mine, 401, "unauthorized")


async def test_sub_of_128_is_accepted(
    http: aiohttp.ClientSession, gateway: Gateway, live: str,
) -> None:
    a = await send(http, "POST", claims_url(gateway, live), data=b"{}",
                   headers=bearer(gateway.token("x" * 128)))
    assert a.status == 201, a.body


async def test_bad_idempotency_key(bad: Bad, gateway: Gateway, live: str) -> None:
    h = {**bearer(gateway.token("idem-user")), "Idempotency-Key": "k" * 256}
    a = await bad("POST", claims_url(gateway, live), data=b"{}", headers=h)
    assert a.status == 400, a.body
    assert a.content_type == "application/problem+json"


# ---- admin credentials and campaign specs ------------------------------------------------

ADMIN_CALLS = [
    ("POST", "/v1/campaigns"), ("GET", "/v1/campaigns"), ("GET", "/v1/campaigns/{id}"),
    ("POST", "/v1/campaigns/{id}/pause"), ("POST", "/v1/campaigns/{id}/resume"),
    ("POST", "/v1/campaigns/{id}/end"), ("POST", "/v1/campaigns/{id}/restock"),
    ("GET", "/openapi-admin.json"),
]


@pytest.mark.parametrize(("method", "path"), ADMIN_CALLS)
async def test_admin_credentials(
    bad: Bad, gateway: Gateway, live: str,
    method: str, path: str,
) -> None:
    url = gateway.base + path.format(id=live)
    body = b'{"quantity": 5}' if path.endswith("restock") else None
    if path == "/v1/campaigns":
        body = json.dumps(spec()).encode() if method == "POST" else None
    for missing in ({}, {"Authorization": "Bearer "}, {"Authorization": gateway.admin_token}):
        a = await bad(method, url, data=body, headers=missing)
        assert_problem(a, 401, "unauthorized")
    for wrong in (gateway.admin_token + "x", gateway.admin_token[:-1], gateway.identity_secret):
        a = await bad(method, url, data=body, headers=bearer(wrong))
        assert_problem(a, 403, "forbidden")
    # An identity token is no admin token.
    a = await bad(method, url, data=body, headers=bearer(gateway.token("admin")))
    assert_problem(a, 403, "forbidden")


def _coupon(**over: Any) -> list[dict[str, Any]]:
    return [{"kind": "amount_off", "value": 500, "currency": "CNY", "valid_days": 7, **over}]


def _bad_specs() -> list[Any]:
    base = spec()
    naive = base["starts_at"][:19]  # no offset
    no_coupons = {k: v for k, v in spec().items() if k != "coupons"}
    c0 = "$.coupons[0]"
    th = f"{c0}.threshold"
    cases: list[tuple[str, Any, str]] = [
        ("stock 0", spec(stock=0), "$.stock"),
        ("stock negative", spec(stock=-5), "$.stock"),
        ("stock a string", spec(stock="100"), "$.stock"),
        ("stock huge", spec(stock=10**30), "$.stock"),
        ("ends first", spec(ends_at=base["starts_at"], starts_at=base["ends_at"]), "$.ends_at"),
        ("percent 150", spec(coupons=_coupon(kind="percent_off", value=150)), "$.coupons[0].value"),
        ("threshold = value", spec(coupons=_coupon(kind="threshold", threshold=500)), th),
        ("threshold < value", spec(coupons=_coupon(kind="threshold", threshold=100)), th),
        ("naive starts_at", spec(starts_at=naive), "$.starts_at"),
        ("not a time", spec(ends_at="tomorrow"), "$.ends_at"),
        ("unknown field", spec(bogus=1), "bogus"),
        ("unknown limit", spec(limits={"per_user": 1, "per_cat": 2}), "per_cat"),
        ("bad id", spec(id="Bad_ID!"), "$.id"),
        ("id too long", spec(id="a" * 64), "$.id"),
        ("missing coupons", no_coupons, "coupons"),
        ("empty coupons", spec(coupons=[]), "$.coupons"),
        ("unknown coupon kind", spec(coupons=_coupon(kind="free_lunch")), "$.coupons[0].kind"),
        ("bad currency", spec(coupons=_coupon(currency="yuan")), "$.coupons[0].currency"),
        ("no validity", spec(coupons=[{"kind": "amount_off", "value": 5}]), f"{c0}.valid_days"),
        ("per_user 0", spec(limits={"per_user": 0}), "$.limits.per_user"),
        ("a list", [spec()], "$"),
    ]
    return [pytest.param(doc, names, id=case) for case, doc, names in cases]


@pytest.mark.parametrize(("doc", "names"), _bad_specs())
async def test_invalid_spec(bad: Bad, gateway: Gateway, doc: Any, names: str) -> None:
    a = await bad("POST", gateway.base + "/v1/campaigns", data=json.dumps(doc).encode(),
                  headers=gateway.admin_headers)
    assert_problem(a, 422, "invalid", names)


async def test_spec_malformed_and_too_large(bad: Bad, gateway: Gateway) -> None:
    url = gateway.base + "/v1/campaigns"
    a = await bad("POST", url, data=b'{"name": "x"', headers=gateway.admin_headers)
    assert_problem(a, 400, "malformed_json")
    big = spec(name="x", id=campaign_id())
    big["padding"] = "p" * (256 * 1024)
    a = await bad("POST", url, data=json.dumps(big).encode(), headers=gateway.admin_headers)
    assert_problem(a, 413, "too_large")


@pytest.mark.parametrize(("body", "status", "code", "names"), [
    (b'{"quantity": 0}', 422, "invalid", "$.quantity"),
    (b'{"quantity": -3}', 422, "invalid", "$.quantity"),
    (b'{"quantity": "5"}', 422, "invalid", "$.quantity"),
    (b'{"quantity": 2.5}', 422, "invalid", "$.quantity"),
    (b"{}", 422, "invalid", "quantity"),
    (b'{"quantity": 5, "extra": 1}', 422, "invalid", "extra"),
    (b'{"quantity": ', 400, "malformed_json", None),
])
async def test_invalid_restock(
    bad: Bad, gateway: Gateway, live: str,
    body: bytes, status: int, code: str, names: str | None,
) -> None:
    url = f"{gateway.base}/v1/campaigns/{live}/restock"
    a = await bad("POST", url, data=body, headers=gateway.admin_headers)
    assert_problem(a, status, code, names)


# ---- unknown things, request ids ---------------------------------------------------------

async def test_unknown_campaign_and_route(bad: Bad, gateway: Gateway) -> None:
    ghost = campaign_id("ghost")
    token = bearer(gateway.token("ghost-user"))
    for h in (token, {}):  # unknown is campaign-wide: no token needed to hear it
        a = await bad("POST", claims_url(gateway, ghost), data=b"{}", headers=h)
        assert_problem(a, 404, "not_found")
    admin = gateway.admin_headers
    for method, verb, data in [("GET", "", None), ("POST", "/pause", None),
                               ("POST", "/end", None), ("POST", "/restock", b'{"quantity": 5}')]:
        path = f"/v1/campaigns/{ghost}{verb}"
        a = await bad(method, gateway.base + path, data=data, headers=admin)
        assert_problem(a, 404, "not_found")
    for path in ("/nope", "/v1/campaigns/x/claims/everything", "/v2/campaigns"):
        a = await bad("GET", gateway.base + path)
        assert_problem(a, 404, "not_found")
    a = await bad("DELETE", claims_url(gateway, ghost))
    assert a.status == 405 and a.content_type == "application/problem+json", a.body


async def test_request_id_echoed_or_made(http: aiohttp.ClientSession, gateway: Gateway) -> None:
    a = await send(http, "GET", gateway.base + "/nope", headers={"X-Request-Id": "abc-123"})
    assert a.headers["X-Request-Id"] == "abc-123"
    assert a.body.get("request_id") == "abc-123"
    for rid in ("bad id <script>", "x" * 65, "é"):
        a = await send(http, "GET", gateway.base + "/nope", headers={"X-Request-Id": rid})
        assert a.headers["X-Request-Id"] and a.headers["X-Request-Id"] != rid


# ---- precedence (DESIGN §4) --------------------------------------------------------------

async def answers_everywhere(
    fresh: aiohttp.ClientSession, url: str, headers: dict[str, str], data: bytes,
    want: tuple[int, str], timeout_s: float = 5.0,
) -> None:
    """Polls on new connections until ten in a row answer `want`, i.e. every worker's view of
    the campaign has caught up; fails if that never happens within the deadline."""
    deadline = time.monotonic() + timeout_s
    streak = 0
    while streak < 10:
        a = await send(fresh, "POST", url, data=data, headers=headers)
        assert a.status < 500, a.body
        streak = streak + 1 if (a.status, a.body.get("code")) == want else 0
        assert time.monotonic() < deadline, f"still {a.status} {a.body}, want {want}"


async def test_sold_out_answers_before_token(
    http: aiohttp.ClientSession, fresh: aiohttp.ClientSession, gateway: Gateway, bad: Bad,
) -> None:
    cid = (await create_campaign(http, gateway, stock=1))["id"]
    url = claims_url(gateway, cid)
    a = await send(http, "POST", url, data=b"{}", headers=bearer(gateway.token("winner")))
    assert a.status == 201, a.body
    await answers_everywhere(fresh, url, {}, b"{}", (410, "sold_out"))
    for h, body in [({}, b"{}"), (TOKENS["forged"](gateway), b'{"channel": ')]:
        a = await bad("POST", url, data=body, headers=h, via=fresh)
        assert_problem(a, 410, "sold_out")


async def test_ended_and_paused_answer_before_token(
    http: aiohttp.ClientSession, fresh: aiohttp.ClientSession, gateway: Gateway, bad: Bad,
) -> None:
    paused = (await create_campaign(http, gateway))["id"]
    ended = (await create_campaign(http, gateway))["id"]
    admin = gateway.admin_headers
    for cid, verb in ((paused, "pause"), (ended, "end")):
        a = await send(http, "POST", f"{gateway.base}/v1/campaigns/{cid}/{verb}", headers=admin)
        assert a.status == 200, a.body
    await answers_everywhere(fresh, claims_url(gateway, paused), {}, b"{}", (409, "paused"))
    await answers_everywhere(fresh, claims_url(gateway, ended), {}, b"{}", (410, "ended"))
    a = await bad("POST", claims_url(gateway, ended), data=b"[",
                  headers=TOKENS["expired"](gateway), via=fresh)
    assert_problem(a, 410, "ended")


@pytest.mark.parametrize("body", [b'{"channel": ', b'{"channel": 5}', b"a" * (CAP + 10)])
async def test_token_before_body(bad: Bad, gateway: Gateway, live: str, body: bytes) -> None:
    for kind in ("missing", "forged", "expired"):
        a = await bad("POST", claims_url(gateway, live), data=body, headers=TOKENS[kind](gateway))
        assert_problem(a, 401, "unauthorized")
