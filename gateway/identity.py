"""Identity tokens: verify a JWT (HS256 with the shared secret; EdDSA/ES256 with configured
public keys, chosen by `kid`, re-read when their file changes) into an `Identity`, with a
short cache of verified tokens; and mint development tokens."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import jwt
import msgspec
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.algorithms import HMACAlgorithm

from gateway.domain import Identity, device_hash, phone_hash
from gateway.errors import Unauthorized

log = logging.getLogger(__name__)

LEEWAY_S = 5
KEY_CHECK_S = 1.0
CACHE_MAX = 100_000
CACHE_TTL_S = 60.0


class TokenClaims(msgspec.Struct):
    """The identity token's claims; anything else in the token is ignored."""

    sub: str
    exp: int | float
    nbf: int | float | None = None
    dev: str | None = None
    phone: str | None = None
    tags: list[str] = []
    region: str = ""
    iss: str | None = None
    aud: str | list[str] | None = None


_claims_decoder = msgspec.json.Decoder(TokenClaims)


class _ValidatedHMAC(HMACAlgorithm):
    """PyJWT re-validates an HMAC secret on every verification (PEM, SSH, DER and JWK
    shape checks: most of the cost of a verification). Only the configured secret is ever
    passed here, so it is validated once and remembered."""

    def __init__(self) -> None:
        super().__init__(HMACAlgorithm.SHA256)
        self._prepared: dict[str | bytes, bytes] = {}

    def prepare_key(self, key: str | bytes) -> bytes:
        prepared = self._prepared.get(key)
        if prepared is None:
            prepared = super().prepare_key(key)
            if len(self._prepared) < 8:
                self._prepared[key] = prepared
        return prepared


_JWS = jwt.PyJWS()
_JWS.unregister_algorithm("HS256")
_JWS.register_algorithm("HS256", _ValidatedHMAC())


class PublicKey:
    def __init__(self, key: Any, algorithm: str, kid: str | None) -> None:
        self.key, self.algorithm, self.kid = key, algorithm, kid


def load_public_keys(path: str) -> list[PublicKey]:
    """A PEM file with one key (its type fixes the algorithm) or a JWKS document."""
    text = Path(path).read_text()
    if text.lstrip().startswith("{"):
        keys = []
        for jwk in jwt.PyJWKSet.from_dict(json.loads(text)).keys:
            if jwk.algorithm_name not in ("EdDSA", "ES256"):
                raise ValueError(f"unsupported key algorithm {jwk.algorithm_name}")
            keys.append(PublicKey(jwk.key, jwk.algorithm_name, jwk.key_id))
        return keys
    key = load_pem_public_key(text.encode())
    if isinstance(key, ed25519.Ed25519PublicKey):
        return [PublicKey(key, "EdDSA", None)]
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return [PublicKey(key, "ES256", None)]
    raise ValueError("identity public key must be Ed25519 or EC P-256")


class KeyFile:
    """The public keys of a PEM or JWKS file, re-read when the file changes (its inode,
    size or mtime; looked at no more than once a second), so a key rotated out of the file
    stops working within about a second. Replace the file atomically (write, then rename):
    a file that does not load keeps the keys already in use, and says so in the log."""

    def __init__(self, path: str, check_every_s: float = KEY_CHECK_S) -> None:
        self.path = path
        self._every = check_every_s
        self._stamp = self._stat()
        self.keys = load_public_keys(path)
        self._next_check = time.monotonic() + check_every_s

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def changed(self) -> bool:
        """Re-read the file if it changed since the last look; True when the keys did."""
        now = time.monotonic()
        if now < self._next_check:
            return False
        self._next_check = now + self._every
        stamp = self._stat()
        if stamp == self._stamp or stamp is None:
            if stamp is None and self._stamp is not None:
                log.warning("identity key file %s is gone; keeping the keys in use", self.path)
            self._stamp = stamp
            return False
        try:
            keys = load_public_keys(self.path)
        except (OSError, ValueError, jwt.PyJWTError) as e:
            log.warning("identity key file %s did not load (%r); keeping the keys in use",
                        self.path, e)
            return False  # the stamp stays old: the next look tries again
        self._stamp = stamp
        self.keys = keys
        log.info("identity keys reloaded from %s: %s", self.path,
                 ", ".join(f"{k.kid or '-'}/{k.algorithm}" for k in keys))
        return True


class Verifier:
    """Turns an `Authorization` header into an Identity, or raises Unauthorized."""

    def __init__(
        self,
        secret: str | None,
        public_keys: list[PublicKey] | KeyFile,
        pii_key: bytes,
        clock: Any = time.time,
        *,
        issuer: str | None = None,
        audience: str | None = None,
        leeway_s: float = LEEWAY_S,
    ) -> None:
        self._secret = secret.encode() if secret else None
        self._key_file = public_keys if isinstance(public_keys, KeyFile) else None
        self._keys = public_keys.keys if isinstance(public_keys, KeyFile) else public_keys
        self._pii_key = pii_key
        self._clock = clock
        self._issuer = issuer or None
        self._audience = audience or None
        self._leeway = leeway_s
        self._cache: dict[str, tuple[Identity, float]] = {}
        # one issuer's tokens share their header segment: parse and match it once
        self._header_keys: dict[str, tuple[Any, str]] = {}

    def _reload_keys(self) -> None:
        assert self._key_file is not None
        if self._key_file.changed():
            self._keys = self._key_file.keys
            self._header_keys.clear()
            self._cache.clear()  # tokens of a retired key must not live on in the cache

    def verify(self, authorization: str | None) -> Identity:
        if not authorization or not authorization.startswith("Bearer "):
            raise Unauthorized("An identity token is required (Authorization: Bearer <jwt>)")
        if self._key_file is not None:
            self._reload_keys()
        token = authorization[7:].strip()
        now = self._clock()
        hit = self._cache.get(token)
        if hit is not None and hit[1] > now:
            return hit[0]
        identity, exp = self._decode(token)
        if len(self._cache) >= CACHE_MAX:
            self._cache.clear()
        self._cache[token] = (identity, exp)
        return identity

    def known(self, authorization: str | None) -> Identity | None:
        """The identity behind a token this worker verified lately and still trusts, with
        nothing verified now; None for any other token."""
        if not authorization or not authorization.startswith("Bearer "):
            return None
        if self._key_file is not None:
            self._reload_keys()
        hit = self._cache.get(authorization[7:].strip())
        return hit[0] if hit is not None and hit[1] > self._clock() else None

    def _key_for(self, token: str) -> tuple[Any, str]:
        segment = token.partition(".")[0]
        found = self._header_keys.get(segment)
        if found is None:
            found = self._match_key(token)
            if len(self._header_keys) >= 64:
                self._header_keys.clear()
            self._header_keys[segment] = found
        return found

    def _match_key(self, token: str) -> tuple[Any, str]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as e:
            raise Unauthorized(f"Malformed identity token: {e}") from None
        alg = header.get("alg")
        if alg == "HS256" and self._secret is not None:
            return self._secret, "HS256"
        kid = header.get("kid")
        for k in self._keys:
            if k.algorithm == alg and (kid == k.kid or (k.kid is None and len(self._keys) == 1)):
                return k.key, k.algorithm
        raise Unauthorized("Identity token signed with an unknown key or algorithm")

    def _decode(self, token: str) -> tuple[Identity, float]:
        key, alg = self._key_for(token)
        try:  # PyJWS checks the header and the signature; the claims are ours to type
            payload = _JWS.decode_complete(token, key, algorithms=[alg])["payload"]
        except jwt.PyJWTError as e:
            raise Unauthorized(f"Invalid identity token: {e}") from None
        try:
            claims = _claims_decoder.decode(payload)
        except msgspec.DecodeError as e:
            raise Unauthorized(f"Identity token claims have the wrong shape: {e}") from None
        now = self._clock()
        if not claims.exp > now - self._leeway:  # `not >`: a NaN never passes
            raise Unauthorized("Identity token has expired")
        if claims.nbf is not None and not claims.nbf <= now + self._leeway:
            raise Unauthorized("Identity token is not valid yet")
        if not 1 <= len(claims.sub) <= 128:
            raise Unauthorized("Identity token `sub` must be 1-128 characters")
        if self._issuer is not None and claims.iss != self._issuer:
            raise Unauthorized("Identity token has the wrong issuer (`iss`)")
        if self._audience is not None and not (
                claims.aud == self._audience
                or (isinstance(claims.aud, list) and self._audience in claims.aud)):
            raise Unauthorized("Identity token is not meant for this service (`aud`)")
        dev, phone = claims.dev, claims.phone
        identity = Identity(
            user_id=claims.sub,
            device_h=device_hash(self._pii_key, dev) if dev else "",
            phone_h=phone_hash(self._pii_key, phone) if phone else "",
            tags=_tag_set(claims.tags),
            region=claims.region,
        )
        # compared before converting: a huge integer `exp` would overflow a float
        return identity, float(min(claims.exp, now + CACHE_TTL_S))


_tag_sets: dict[tuple[str, ...], frozenset[str]] = {}


def _tag_set(tags: list[str]) -> frozenset[str]:
    """One shared frozenset per distinct tag list (a release has few): frozensets are
    tracked by the garbage collector, and one per cached identity would be walked by every
    full collection."""
    key = tuple(tags)
    found = _tag_sets.get(key)
    if found is None:
        if len(_tag_sets) >= 4096:
            _tag_sets.clear()
        found = _tag_sets[key] = frozenset(tags)
    return found


def mint_token(
    secret: str,
    sub: str,
    *,
    ttl_s: int = 3600,
    dev: str | None = None,
    phone: str | None = None,
    tags: list[str] | None = None,
    region: str | None = None,
) -> str:
    """A development HS256 identity token."""
    claims: dict[str, Any] = {"sub": sub, "exp": int(time.time()) + ttl_s}
    if dev:
        claims["dev"] = dev
    if phone:
        claims["phone"] = phone
    if tags:
        claims["tags"] = tags
    if region:
        claims["region"] = region
    return jwt.encode(claims, secret, algorithm="HS256")
