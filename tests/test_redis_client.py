"""The gateway's Redis connections pack commands with hiredis: byte for byte what redis-py's
own packer writes, over TCP and unix sockets, and a real server understands them."""

from __future__ import annotations

from pathlib import Path

import pytest
from redis.asyncio.connection import Connection, UnixDomainSocketConnection

from gateway.embedded import EmbeddedRedis
from gateway.redis.client import hiredis_packed, redis_client
from gateway.settings import Settings
from tests.servers import RedisServer

COMMANDS = [
    ("EVALSHA", "a" * 40, 2, "fc:{c:x}:meta", "fc:{c:x}:users", "ü-user", 0, -5, 10**15),
    ("SCRIPT LOAD", "return 1"),  # redis-py splits a command name given with a space
    ("SET", b"bytes\x00key", bytearray(b"v"), memoryview(b"mv")),
    ("HSET", "k", "f", 1.5),
]


@pytest.mark.parametrize("cls", [Connection, UnixDomainSocketConnection])
@pytest.mark.parametrize("args", COMMANDS)
def test_packs_as_redis_py_does(cls: type[Connection], args: tuple[object, ...]) -> None:
    plain = cls()
    packed = hiredis_packed(cls)()
    assert isinstance(packed, cls)
    assert b"".join(packed.pack_command(*args)) == b"".join(  # type: ignore[arg-type]
        bytes(c) for c in plain.pack_command(*args))  # type: ignore[arg-type]


async def test_a_real_server_understands(redis_server: RedisServer, tmp_path: Path) -> None:
    embedded = EmbeddedRedis(tmp_path / "redis", appendfsync="everysec")  # a unix socket
    embedded.start()
    try:
        for url in (redis_server.url, embedded.url):
            await round_trip(url)
    finally:
        embedded.stop()


async def round_trip(url: str) -> None:
    client = redis_client(Settings(redis_url=url))
    try:
        pool = client.connection_pool
        assert pool.connection_class.__name__.startswith("HiredisPacked")
        await client.hset("h", mapping={"ü": "1", "n": 2})
        assert await client.hgetall("h") == {"ü": "1", "n": "2"}
        sha = await client.script_load("return {KEYS[1], ARGV[1]}")
        assert await client.evalsha(sha, 1, "k", "ä") == ["k", "ä"]
    finally:
        await client.aclose()
