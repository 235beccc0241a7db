"""Identity tokens over HTTP against a running gateway that trusts an HS256 secret and a
JWKS file: forged, expired, unsigned and HS/EdDSA-confused tokens get 401, and a key
rotated out of the JWKS file stops working at every worker."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from jwt.algorithms import OKPAlgorithm

from tests.conftest import claim, create_campaign
from tests.servers import Gateway, RedisServer
from tests.test_identity import hand_signed

_users = itertools.count(1)


def user() -> str:
    return f"idh-{next(_users)}-{time.monotonic_ns()}"


def write_jwks(path: Path, keys: dict[str, ed25519.Ed25519PrivateKey]) -> None:
    """Written beside the target and renamed over it, as an operator should."""
    docs = [{**OKPAlgorithm.to_jwk(k.public_key(), as_dict=True), "kid": kid, "use": "sig"}
            for kid, k in keys.items()]
    staged = path.with_suffix(".new")
    staged.write_text(json.dumps({"keys": docs}))
    staged.replace(path)


class Keys:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.old = ed25519.Ed25519PrivateKey.generate()
        self.new = ed25519.Ed25519PrivateKey.generate()
        write_jwks(path, {"k-old": self.old})


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys(tmp_path_factory.mktemp("keys") / "jwks.json")


@pytest.fixture(scope="module")
def gw(redis_server: RedisServer, keys: Keys,
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = Gateway(redis_server.url, tmp_path_factory.mktemp("gw-identity"), workers=2,
                identity_public_keys=str(keys.path), identity_audience="flashclaim",
                user_rate_per_s="0")
    g.start()
    yield g
    g.stop()


def claims(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"sub": user(), "exp": int(time.time()) + 600, "aud": "flashclaim"}
    doc.update(over)
    return {k: v for k, v in doc.items() if v is not None}


def hs(secret: str | bytes, **over: Any) -> str:
    key = secret.encode() if isinstance(secret, str) else secret
    return hand_signed({"alg": "HS256", "typ": "JWT"}, claims(**over),
                       lambda m: hmac.new(key, m, hashlib.sha256).digest())


def ed(key: ed25519.Ed25519PrivateKey, kid: str | None, **over: Any) -> str:
    headers = {"kid": kid} if kid else None
    return jwt.encode(claims(**over), key, algorithm="EdDSA", headers=headers)


async def status_of(http: aiohttp.ClientSession, gw: Gateway, cid: str, token: str) -> int:
    status, body, _ = await claim(http, gw, cid, token)
    if status == 401:
        assert body["code"] == "unauthorized" and body["status"] == 401, body
    return status


async def test_bad_tokens_get_401(http: aiohttp.ClientSession, gw: Gateway,
                                  keys: Keys) -> None:
    cid = (await create_campaign(http, gw, stock=1000))["id"]
    public_pem = keys.old.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    public_raw = keys.old.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    now = int(time.time())
    good = {"hs256": hs(gw.identity_secret), "eddsa": ed(keys.old, "k-old")}
    bad = {
        "forged (another secret)": hs("not-the-gateway-secret-0123456789abcdef"),
        "forged (another key, known kid)": ed(ed25519.Ed25519PrivateKey.generate(), "k-old"),
        "unknown kid": ed(keys.old, "k-unknown"),
        "tampered payload": ".".join([good["eddsa"].split(".")[0],
                                      hs("x").split(".")[1], good["eddsa"].split(".")[2]]),
        "expired": hs(gw.identity_secret, exp=now - 120),
        "expired (eddsa)": ed(keys.old, "k-old", exp=now - 120),
        "no exp": hs(gw.identity_secret, exp=None),
        "wrong audience": hs(gw.identity_secret, aud="wallet"),
        "no audience": ed(keys.old, "k-old", aud=None),
        "alg none": hand_signed({"alg": "none", "typ": "JWT"}, claims()),
        "alg none, kid": hand_signed({"alg": "none", "kid": "k-old"}, claims()) + "c2ln",
        "HS256 with the public key PEM": hs(public_pem),
        "HS256 with the public key PEM, kid": hand_signed(
            {"alg": "HS256", "kid": "k-old"}, claims(),
            lambda m: hmac.new(public_pem, m, hashlib.sha256).digest()),
        "HS256 with the raw public key": hs(public_raw),
        "HS256 with the JWKS file": hs(keys.path.read_bytes()),
        "not a JWT": "definitely-not-a-jwt",
    }
    for name, token in good.items():
        assert await status_of(http, gw, cid, token) == 201, name
    for name, token in bad.items():
        assert await status_of(http, gw, cid, token) == 401, name
    async with http.post(f"{gw.base}/v1/campaigns/{cid}/claims") as r:
        assert r.status == 401


async def test_key_rotated_out_of_the_jwks_stops_working(
    http: aiohttp.ClientSession, gw: Gateway, keys: Keys
) -> None:
    cid = (await create_campaign(http, gw, stock=10_000))["id"]
    assert await status_of(http, gw, cid, ed(keys.old, "k-old")) == 201
    assert await status_of(http, gw, cid, ed(keys.new, "k-new")) == 401

    async def settles(token_of: Any, want: int) -> None:
        """Every worker answers `want` for fresh tokens, several times in a row."""
        deadline = time.monotonic() + 15
        streak = 0
        while streak < 12:
            assert time.monotonic() < deadline, f"keys not reloaded: still not {want}"
            streak = streak + 1 if await status_of(http, gw, cid, token_of()) == want else 0

    write_jwks(keys.path, {"k-old": keys.old, "k-new": keys.new})
    await settles(lambda: ed(keys.new, "k-new"), 201)
    reused = ed(keys.old, "k-old")  # verified, and cached, by both workers before retirement
    for _ in range(4):
        assert await status_of(http, gw, cid, reused) in (201, 409)

    write_jwks(keys.path, {"k-new": keys.new})
    await settles(lambda: ed(keys.old, "k-old"), 401)
    for _ in range(8):
        assert await status_of(http, gw, cid, reused) == 401
        assert await status_of(http, gw, cid, ed(keys.new, "k-new")) == 201
