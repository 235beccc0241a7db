"""gateway.http.adminauth: admin tokens with names and scopes, the admin API on a listener
of its own (TCP or a unix socket) and absent from the public port and document."""

from __future__ import annotations

import os
import secrets
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.http.adminauth import AdminAuth, Listen, admin_tokens
from gateway.settings import Settings
from tests.conftest import spec
from tests.servers import Gateway, RedisServer, free_port

READ = "r" + secrets.token_urlsafe(20)
WRITE = "w" + secrets.token_urlsafe(20)


# ---- configuration -----------------------------------------------------------------------

def test_tokens_from_the_setting_the_list_and_the_file(tmp_path: Path) -> None:
    f = tmp_path / "tokens"
    f.write_text(f"# operators\nauditor:read:{'a' * 16}\n\n  oncall : write : {'b' * 20}\n")
    tokens = admin_tokens(Settings(admin_token="legacy", admin_tokens_file=str(f),
                                   admin_tokens=f"ops:read:{READ}, deploy:write:{WRITE}"))
    assert [(t.name, t.scope) for t in tokens] == [
        ("admin", "write"), ("ops", "read"), ("deploy", "write"), ("auditor", "read"),
        ("oncall", "write")]
    auth = AdminAuth(tokens)
    for presented, name in [("legacy", "admin"), (READ, "ops"), (WRITE, "deploy"),
                            ("a" * 16, "auditor"), ("b" * 20, "oncall")]:
        found = auth.match(presented)
        assert found is not None and found.name == name
    for wrong in ("", "legacy ", READ[:-1], READ + "x", "ops", "read", WRITE.upper()):
        assert auth.match(wrong) is None
    assert str(READ) not in repr(tokens)  # only digests are kept


def test_a_token_with_a_colon_keeps_it() -> None:
    (t,) = admin_tokens(Settings(admin_tokens="ops:read:abc:def:0123456789abcdef"))
    assert AdminAuth([t]).match("abc:def:0123456789abcdef") == t


@pytest.mark.parametrize("value", [
    "ops:admin:0123456789abcdef", "ops:read:short", ":read:0123456789abcdef",
    "ops read 0123456789abcdef", "o ps:read:0123456789abcdef",
    "ops:read:0123456789abcdef,ops:write:fedcba9876543210",
    "a:read:0123456789abcdef,b:write:0123456789abcdef",
])
def test_bad_token_lists_stop_start_up(value: str) -> None:
    with pytest.raises(ValueError):
        admin_tokens(Settings(admin_tokens=value))


def test_no_admin_token_at_all_stops_start_up() -> None:
    with pytest.raises(ValueError):
        AdminAuth(admin_tokens(Settings()))


def test_scopes() -> None:
    read, write = admin_tokens(Settings(admin_tokens=f"r:read:{READ},w:write:{WRITE}"))
    assert read.allows("read") and not read.allows("write")
    assert write.allows("read") and write.allows("write")


@pytest.mark.parametrize(("value", "want"), [
    ("127.0.0.1:9090", Listen("127.0.0.1", 9090, "")),
    ("[::1]:9090", Listen("::1", 9090, "")),
    ("localhost:1", Listen("localhost", 1, "")),
    ("unix:/run/flashclaim/admin.sock", Listen("", 0, "/run/flashclaim/admin.sock")),
])
def test_listen_parses(value: str, want: Listen) -> None:
    assert Listen.parse(value) == want
    assert Listen.parse(str(want)) == want


@pytest.mark.parametrize("value", ["9090", "host:", ":9090", "host:0", "host:70000",
                                   "host:http", "unix:"])
def test_listen_refuses(value: str) -> None:
    with pytest.raises(ValueError):
        Listen.parse(value)


# ---- over HTTP: scopes -------------------------------------------------------------------

async def call(http: aiohttp.ClientSession, base: str, method: str, path: str,
               token: str | None, body: Any = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.request(method, base + path, json=body, headers=headers) as r:
        return r.status, await r.json(content_type=None)


@pytest.fixture(scope="module")
def scoped(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory,
           ) -> Iterator[Gateway]:
    gw = Gateway(redis_server.url, tmp_path_factory.mktemp("gw-scoped"), workers=2,
                 admin_tokens=f"ops:read:{READ},deploy:write:{WRITE}")
    gw.start()
    yield gw
    gw.stop()


def write_calls(cid: str) -> list[tuple[str, str, Any]]:
    return [
        ("POST", "/v1/campaigns", spec()),
        ("POST", f"/v1/campaigns/{cid}/pause", None),
        ("POST", f"/v1/campaigns/{cid}/resume", None),
        ("POST", f"/v1/campaigns/{cid}/restock", {"quantity": 5}),
        ("PUT", f"/v1/campaigns/{cid}/admission", {"admit_per_s": 50}),
        ("POST", f"/v1/campaigns/{cid}/end", None),
    ]


def read_calls(cid: str) -> list[tuple[str, str]]:
    return [("GET", "/v1/campaigns"), ("GET", f"/v1/campaigns/{cid}"),
            ("GET", f"/v1/campaigns/{cid}/top"), ("GET", "/openapi-admin.json")]


async def test_read_scope_reads_and_cannot_write(http: aiohttp.ClientSession,
                                                 scoped: Gateway) -> None:
    status, created = await call(http, scoped.base, "POST", "/v1/campaigns", WRITE,
                                 spec(stock=10))
    assert status == 201, created
    cid = created["id"]
    for method, path in read_calls(cid):
        for token in (READ, WRITE, scoped.admin_token):
            assert (await call(http, scoped.base, method, path, token))[0] == 200, path
    for method, path, body in write_calls(cid):
        status, problem = await call(http, scoped.base, method, path, READ, body)
        assert status == 403 and problem["code"] == "forbidden", (path, problem)
        assert "read" in problem["detail"]
    assert (await call(http, scoped.base, "GET", f"/v1/campaigns/{cid}", READ))[1] == created
    for token in (WRITE, scoped.admin_token):  # write scope, from the list and the legacy one
        status, body = await call(http, scoped.base, "POST", f"/v1/campaigns/{cid}/pause",
                                  token)
        assert (status, body["status"]) == (200, "paused")
        assert (await call(http, scoped.base, "POST", f"/v1/campaigns/{cid}/resume",
                           token))[0] == 200


async def test_unknown_or_missing_admin_token(http: aiohttp.ClientSession,
                                              scoped: Gateway) -> None:
    for token, want in [(None, 401), (READ + "x", 403), (scoped.identity_secret, 403),
                        (scoped.token("u1"), 403), ("ops", 403)]:
        for method, path in read_calls("nope"):
            assert (await call(http, scoped.base, method, path, token))[0] == want, path


# ---- the public OpenAPI document ---------------------------------------------------------

def operations(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(p, m) for p, ops in doc["paths"].items() for m in ops}


async def test_public_document_has_no_admin_route(http: aiohttp.ClientSession,
                                                  gateway: Gateway) -> None:
    status, public = await call(http, gateway.base, "GET", "/openapi.json", None)
    assert status == 200
    status, admin = await call(http, gateway.base, "GET", "/openapi-admin.json",
                               gateway.admin_token)
    assert status == 200
    assert operations(public) == {
        ("/v1/campaigns/{id}/claims", "post"), ("/v1/campaigns/{id}/claims/mine", "get"),
        ("/healthz", "get"), ("/readyz", "get"), ("/metrics", "get")}
    assert not operations(public) & operations(admin)
    assert ("/v1/campaigns", "post") in operations(admin)
    assert (await call(http, gateway.base, "GET", "/openapi-admin.json", None))[0] == 401


# ---- the admin API on a listener of its own ----------------------------------------------

def wait_admin(connector_of: Any, base: str, timeout_s: float = 30) -> None:
    import asyncio

    async def ready() -> bool:
        try:
            async with aiohttp.ClientSession(connector=connector_of()) as s, s.get(
                    base + "/readyz", timeout=aiohttp.ClientTimeout(total=1)) as r:
                return r.status == 200
        except (aiohttp.ClientError, OSError, TimeoutError):
            return False

    deadline = time.monotonic() + timeout_s
    while not asyncio.run(ready()):
        assert time.monotonic() < deadline, "the admin listener did not come up"
        time.sleep(0.1)


@pytest.fixture(scope="module", params=["tcp", "unix"])
def apart(request: pytest.FixtureRequest, redis_server: RedisServer,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, str, Any]]:
    """A gateway whose admin API listens apart; yields it, the admin base URL and a
    connector factory for that listener."""
    work = tmp_path_factory.mktemp(f"gw-apart-{request.param}")
    if request.param == "tcp":
        port = free_port()
        listen, base = f"127.0.0.1:{port}", f"http://127.0.0.1:{port}"
        connector: Any = aiohttp.TCPConnector
    else:
        sock = str(work / "admin.sock")
        listen, base = f"unix:{sock}", "http://admin"

        def connector() -> aiohttp.UnixConnector:
            return aiohttp.UnixConnector(path=sock)
    gw = Gateway(redis_server.url, work, workers=2, admin_listen=listen,
                 admin_tokens=f"ops:read:{READ},deploy:write:{WRITE}")
    gw.start()
    try:
        wait_admin(connector, base)
        if request.param == "unix":
            assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        yield gw, base, connector
    finally:
        gw.stop()


async def test_admin_api_only_on_its_own_listener(
    http: aiohttp.ClientSession, apart: tuple[Gateway, str, Any]
) -> None:
    gw, admin_base, connector = apart
    async with aiohttp.ClientSession(connector=connector()) as admin_http:
        status, created = await call(admin_http, admin_base, "POST", "/v1/campaigns", WRITE,
                                     spec(stock=3))
        assert status == 201, created
        cid = created["id"]
        for method, path in read_calls(cid):
            assert (await call(admin_http, admin_base, method, path, READ))[0] == 200, path
        # the claimant side is not served there
        async with admin_http.post(f"{admin_base}/v1/campaigns/{cid}/claims",
                                   headers={"Authorization": f"Bearer {gw.token('u1')}"}) as r:
            assert r.status == 404
        for path in ("/openapi.json", "/metrics"):
            assert (await call(admin_http, admin_base, "GET", path, None))[0] == 404

        # the public port serves claims, and no admin route, whatever the token
        async with http.post(f"{gw.base}/v1/campaigns/{cid}/claims",
                             headers={"Authorization": f"Bearer {gw.token('u1')}"}) as r:
            assert r.status == 201, await r.text()
        for token in (WRITE, gw.admin_token, None):
            for method, path in read_calls(cid):
                status, body = await call(http, gw.base, method, path, token)
                assert (status, body["code"]) == (404, "not_found"), (path, body)
            for method, path, payload in write_calls(cid):
                status, body = await call(http, gw.base, method, path, token, payload)
                assert (status, body["code"]) == (404, "not_found"), (path, body)
        status, public = await call(http, gw.base, "GET", "/openapi.json", None)
        assert status == 200 and ("/v1/campaigns", "post") not in operations(public)

        # and nothing changed through the public port
        status, now = await call(admin_http, admin_base, "GET", f"/v1/campaigns/{cid}", READ)
        assert (now["status"], now["stock"], now["claimed"]) == ("live", 3, 1)


@pytest.mark.parametrize(("env", "needle"), [
    ({"FLASHCLAIM_ADMIN_TOKENS": "ops:root:0123456789abcdef"}, "scope"),
    ({"FLASHCLAIM_ADMIN_LISTEN": "localhost"}, "FLASHCLAIM_ADMIN_LISTEN"),
    ({"FLASHCLAIM_ADMIN_TOKEN": ""}, "FLASHCLAIM_ADMIN_TOKEN"),
])
def test_serve_refuses_a_bad_admin_configuration(tmp_path: Path, env: dict[str, str],
                                                 needle: str) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("FLASHCLAIM_")}
    base.update({"FLASHCLAIM_REDIS_URL": "redis://127.0.0.1:1/0",
                 "FLASHCLAIM_SIGNING_SECRET": "s" * 24, "FLASHCLAIM_IDENTITY_SECRET": "i" * 24,
                 "FLASHCLAIM_ADMIN_TOKEN": "a" * 24, "FLASHCLAIM_VAR_DIR": str(tmp_path)})
    base.update(env)
    if not base["FLASHCLAIM_ADMIN_TOKEN"]:
        del base["FLASHCLAIM_ADMIN_TOKEN"]
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "serve", "--port", "1"],
                          env=base, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert needle in done.stderr
