"""The Redis clients every process uses: a blocking pool (callers wait for a connection
instead of failing) and short timeouts. Scripts that change state go through a client
without automatic retries; reads may use one that retries once, which also heals a pooled
connection left stale by a Redis restart."""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.settings import Settings


def redis_client(
    settings: Settings, max_connections: int | None = None, *, retries: int = 0
) -> Redis:
    """`retries=0` for anything that writes: re-sending a claim script after a timeout
    could grant twice."""
    if not settings.redis_url:
        raise RuntimeError("FLASHCLAIM_REDIS_URL is not set")
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=max_connections or settings.redis_max_connections,
        timeout=settings.redis_timeout_s,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        decode_responses=True,
        retry=Retry(NoBackoff(), retries),
    )
    return Redis.from_pool(pool)  # the client owns, and closes, its pool
