"""Who may use the admin API: admin tokens with a name and a scope (`read` or `write`),
checked in constant time against every configured token, and where the API listens."""

from __future__ import annotations

import hashlib
import hmac
import re
from pathlib import Path
from typing import Literal, NamedTuple

from aiohttp import web

from gateway import errors
from gateway.http.context import GATEWAY, Gateway
from gateway.settings import Settings

Scope = Literal["read", "write"]
SCOPES: tuple[Scope, ...] = ("read", "write")
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
TOKEN_MIN = 16


class AdminToken(NamedTuple):
    name: str
    scope: Scope
    digest: bytes  # sha256 of the token: equal lengths for compare_digest, no token kept

    def allows(self, scope: Scope) -> bool:
        return self.scope == "write" or scope == "read"


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _parse_entry(entry: str, where: str) -> AdminToken:
    name, scope, token = [*entry.split(":", 2), "", ""][:3]
    name, scope, token = name.strip(), scope.strip(), token.strip()
    if not _NAME.match(name):
        raise ValueError(f"{where}: admin token name {name!r} is not 1-64 of [A-Za-z0-9_.@-]")
    if scope not in SCOPES:
        raise ValueError(f"{where}: admin token {name!r} has scope {scope!r}; use read or write")
    if len(token) < TOKEN_MIN:
        raise ValueError(f"{where}: admin token {name!r} is shorter than {TOKEN_MIN} characters")
    return AdminToken(name, scope, _digest(token))


def admin_tokens(settings: Settings) -> list[AdminToken]:
    """FLASHCLAIM_ADMIN_TOKEN (named `admin`, scope write), then the `name:scope:token`
    entries of FLASHCLAIM_ADMIN_TOKENS (comma-separated) and FLASHCLAIM_ADMIN_TOKENS_FILE
    (one a line, `#` comments). Raises ValueError on a malformed entry or a repeated name."""
    tokens: list[AdminToken] = []
    if settings.admin_token:
        tokens.append(AdminToken("admin", "write", _digest(settings.admin_token)))
    for entry in settings.admin_tokens.split(","):
        if entry.strip():
            tokens.append(_parse_entry(entry, "FLASHCLAIM_ADMIN_TOKENS"))
    if settings.admin_tokens_file:
        path = settings.admin_tokens_file
        for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
            if line.strip() and not line.lstrip().startswith("#"):
                tokens.append(_parse_entry(line, f"{path}:{n}"))
    names = [t.name for t in tokens]
    if len(set(names)) != len(names):
        raise ValueError(f"admin token names must be unique: {sorted(names)}")
    if len({t.digest for t in tokens}) != len(tokens):
        raise ValueError("two admin tokens are the same secret")
    return tokens


class AdminAuth:
    def __init__(self, tokens: list[AdminToken]) -> None:
        if not tokens:
            raise ValueError("set FLASHCLAIM_ADMIN_TOKEN, FLASHCLAIM_ADMIN_TOKENS "
                             "or FLASHCLAIM_ADMIN_TOKENS_FILE")
        self._tokens = tokens

    def match(self, presented: str) -> AdminToken | None:
        """The token `presented` is, compared against every one so that the time taken
        says nothing about which (or whether one) matched."""
        digest = _digest(presented)
        found = None
        for t in self._tokens:
            if hmac.compare_digest(digest, t.digest):
                found = t
        return found


ADMIN_AUTH = web.AppKey("admin_auth", AdminAuth)
ADMIN = web.RequestKey("admin", AdminToken)  # who made this admin request


def require_admin(request: web.Request, scope: Scope = "write") -> Gateway:
    """The caller's admin token must carry `scope` (write covers read): 401 without a
    token, 403 with an unknown one or one of too small a scope."""
    auth = request.headers.get("Authorization", "")
    if not auth.startswith("Bearer "):
        raise errors.Unauthorized(
            "The admin API needs `Authorization: Bearer <admin token>`",
            headers={"WWW-Authenticate": 'Bearer realm="flashclaim-admin"'},
        )
    token = request.app[ADMIN_AUTH].match(auth[7:].strip())
    if token is None:
        raise errors.Forbidden("That admin token is not valid")
    if not token.allows(scope):
        raise errors.Forbidden(f"Admin token {token.name!r} has scope {token.scope!r}; "
                               f"this needs {scope!r}")
    request[ADMIN] = token
    return request.app[GATEWAY]


class Listen(NamedTuple):
    """Where the admin API listens: `host:port`, `[v6]:port` or `unix:/path`."""

    host: str
    port: int
    path: str  # a unix socket when set

    @classmethod
    def parse(cls, value: str) -> Listen:
        if value.startswith("unix:"):
            path = value.removeprefix("unix:")
            if not path:
                raise ValueError("FLASHCLAIM_ADMIN_LISTEN `unix:` needs a path")
            return cls("", 0, path)
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"FLASHCLAIM_ADMIN_LISTEN {value!r}: use host:port or unix:/path")
        return cls(host.removeprefix("[").removesuffix("]"), int(port), "")

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.path else f"{self.host}:{self.port}"
