"""The Redis clients every process uses: a blocking pool (callers wait for a connection
instead of failing) and short timeouts, or, for a `redis+cluster://` URL, redis-py's cluster
client. Scripts that change state go through a client without automatic retries; reads may
use one that retries once, which also heals a pooled connection left stale by a restart."""

from __future__ import annotations

import functools
from typing import Any
from urllib.parse import unquote

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection, Connection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.connection import HiredisRespSerializer

from gateway.settings import Settings

RedisClient = Redis | RedisCluster
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")


def is_cluster_url(url: str) -> bool:
    return url.startswith(CLUSTER_SCHEMES)


def cluster_nodes(url: str) -> tuple[list[tuple[str, int]], str | None, str | None, bool]:
    """`redis+cluster://[user:password@]host:port[,host:port...]` (`rediss+cluster` for
    TLS) into its startup nodes, username, password and TLS flag."""
    scheme, _, rest = url.partition("://")
    userinfo, _, hosts = rest.rpartition("@")
    hosts = hosts.split("/", 1)[0].split("?", 1)[0]
    nodes = []
    for part in hosts.split(","):
        host, _, port = part.strip().rpartition(":") if ":" in part else (part.strip(), "", "")
        if not host:
            raise ValueError(f"cluster URL node {part!r} has no host")
        nodes.append((host.strip("[]"), int(port or 6379)))
    user, password = None, None
    if userinfo:
        u, sep, p = userinfo.partition(":")
        user, password = (unquote(u) or None, unquote(p)) if sep else (None, unquote(u))
    return nodes, user, password, scheme == "rediss+cluster"


def redis_client(
    settings: Settings, max_connections: int | None = None, *, retries: int = 0
) -> RedisClient:
    """`retries=0` for anything that writes: re-sending a claim script after a timeout
    could grant twice. (A cluster client still follows MOVED/ASK: the script did not run.)"""
    if not settings.redis_url:
        raise RuntimeError("FLASHCLAIM_REDIS_URL is not set")
    limit = max_connections or settings.redis_max_connections
    if is_cluster_url(settings.redis_url):
        nodes, user, password, tls = cluster_nodes(settings.redis_url)
        return RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in nodes],
            username=user,
            password=password,
            ssl=tls,
            # the cluster pool does not wait for a free connection, it fails: allow as many
            # per node as claims may wait on Redis at once
            max_connections=max(limit, settings.redis_inflight),
            socket_timeout=settings.redis_timeout_s,
            socket_connect_timeout=settings.redis_timeout_s,
            decode_responses=True,
            retry=Retry(NoBackoff(), retries),
        )
    options: dict[str, Any] = {
        "max_connections": limit, "timeout": settings.redis_timeout_s,
        "socket_timeout": settings.redis_timeout_s,
        "socket_connect_timeout": settings.redis_timeout_s, "decode_responses": True,
        "retry": Retry(NoBackoff(), retries),
        **parse_url(settings.redis_url),  # as `from_url`: the URL's options win
    }
    options["connection_class"] = hiredis_packed(options.get("connection_class", Connection))
    return Redis.from_pool(BlockingConnectionPool(**options))  # the client owns its pool


_PACKER = HiredisRespSerializer()


@functools.cache
def hiredis_packed(cls: type[AbstractConnection]) -> type[AbstractConnection]:
    """`cls` packing commands with hiredis, as redis-py's own synchronous connections do
    (its asyncio ones pack in Python: ~4 % of a granting worker, for the claim script's
    hundreds of arguments per batch)."""

    class HiredisPacked(cls):  # type: ignore[valid-type,misc]
        def pack_command(self, *args: Any) -> list[bytes]:
            return _PACKER.pack(*args)  # type: ignore[no-any-return]

    HiredisPacked.__name__ = HiredisPacked.__qualname__ = f"HiredisPacked{cls.__name__}"
    return HiredisPacked


async def drop_idle(client: RedisClient) -> None:
    """Close idle pooled connections (after Redis went away they are all dead)."""
    if isinstance(client, RedisCluster):
        for node in client.get_nodes():
            await node.disconnect_free_connections()
    else:
        await client.connection_pool.disconnect(inuse_connections=False)


def socket_timeout(client: RedisClient) -> float | None:
    kwargs = (client.get_connection_kwargs() if isinstance(client, RedisCluster)
              else client.connection_pool.connection_kwargs)
    timeout = kwargs.get("socket_timeout")
    return float(timeout) if timeout else None


async def connect(client: RedisClient) -> None:
    """A cluster client learns the slot map before its first command; doing it once up
    front keeps concurrent first commands from racing on an empty map."""
    if isinstance(client, RedisCluster):
        await client.initialize()
