"""The Redis client every process uses: a blocking pool (callers wait for a connection
instead of failing), short timeouts, and no automatic retries."""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.settings import Settings


def redis_client(settings: Settings, max_connections: int | None = None) -> Redis:
    """No automatic retries: re-sending a claim script after a timeout could grant twice."""
    if not settings.redis_url:
        raise RuntimeError("FLASHCLAIM_REDIS_URL is not set")
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=max_connections or settings.redis_max_connections,
        timeout=settings.redis_timeout_s,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        decode_responses=True,
        retry=Retry(NoBackoff(), 0),
    )
    return Redis.from_pool(pool)  # the client owns, and closes, its pool
