"""Claim micro-batching: claims that arrive in one event-loop tick go to Redis as one
`claim.lua` call per campaign, and each request awaits its own verdict. A failed call fails
only its own claims (503). Single-flight: identical claims in flight (one user's repeat
clicks) share one verdict instead of each going to Redis."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import NamedTuple

from redis.exceptions import ConnectionError, RedisError, ResponseError

from gateway.domain import Outcome
from gateway.errors import Problem, Unavailable
from gateway.metrics import REDIS_BATCH, REDIS_ERRORS, REDIS_ROUNDTRIP
from gateway.redis.client import drop_idle
from gateway.redis.health import RedisHealth
from gateway.redis.scripts import ClaimArgs, Scripts

log = logging.getLogger(__name__)

MAX_BATCH = 256
_TRANSIENT = ("OOM", "BUSY", "LOADING", "MASTERDOWN", "READONLY", "TRYAGAIN", "CLUSTERDOWN")


class Verdict(NamedTuple):
    outcome: Outcome
    data: str  # "seq:ms" for grants; the user's grants for limits; starts ms for not_started
    now_ms: int  # Redis TIME of the decision
    remaining: int  # stock left after the batch
    version: int  # the campaign's meta version the batch saw


def redis_unavailable() -> Unavailable:
    return Unavailable("Claims are unavailable right now; retry shortly", retry_after=1)


class ClaimBatcher:
    def __init__(
        self, scripts: Scripts, health: RedisHealth, idem_ttl_ms: int, backlog_max: int
    ) -> None:
        self._scripts = scripts
        self._health = health
        self._idem_ttl_ms = idem_ttl_ms
        self._backlog_max = backlog_max
        self._pending: dict[str, list[tuple[ClaimArgs, asyncio.Future[Verdict]]]] = {}
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._inflight: dict[tuple[str, ClaimArgs], asyncio.Future[Verdict]] = {}

    def in_flight(self, campaign_id: str, claim: ClaimArgs) -> asyncio.Future[Verdict] | None:
        """The pending verdict of an identical shared claim, if one is in flight."""
        return self._inflight.get((campaign_id, claim))

    def submit(
        self, campaign_id: str, claim: ClaimArgs, *, shared: bool = False
    ) -> asyncio.Future[Verdict]:
        """The verdict for `claim`; with `shared`, identical claims may join it meanwhile
        (`in_flight`), and the caller answers them as a second claim would be answered."""
        fut = self._submit(campaign_id, claim)
        if shared:
            key = (campaign_id, claim)
            self._inflight[key] = fut
            fut.add_done_callback(lambda _: self._inflight.pop(key, None))
        return fut

    def _submit(self, campaign_id: str, claim: ClaimArgs) -> asyncio.Future[Verdict]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Verdict] = loop.create_future()
        if self._health.cooling_down:
            fut.set_exception(redis_unavailable())
            return fut
        self._pending.setdefault(campaign_id, []).append((claim, fut))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, {}
        for campaign_id, items in pending.items():
            for i in range(0, len(items), MAX_BATCH):
                task = asyncio.ensure_future(self._run(campaign_id, items[i : i + MAX_BATCH]))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _run(
        self, campaign_id: str, items: list[tuple[ClaimArgs, asyncio.Future[Verdict]]]
    ) -> None:
        started = time.perf_counter()
        try:
            raw = await self._scripts.claim(
                campaign_id, [c for c, _ in items], self._idem_ttl_ms, self._backlog_max
            )
            now_ms, remaining, version = int(raw[0]), int(raw[1]), int(raw[2])
            verdicts = [
                Verdict(Outcome(int(raw[3 + 2 * i])), str(raw[4 + 2 * i]), now_ms, remaining,
                        version)
                for i in range(len(items))
            ]
        except (RedisError, OSError) as e:
            self._health.failed()
            REDIS_ERRORS.labels(type(e).__name__).inc()
            if isinstance(e, ResponseError) and not str(e).startswith(_TRANSIENT):
                log.error("claim script error for %s: %r", campaign_id, e)
            else:
                log.warning("claim batch for %s failed: %r", campaign_id, e)
            self._fail(items, redis_unavailable())
            if isinstance(e, ConnectionError | OSError):
                # Redis went away: its other pooled connections are dead too
                await drop_idle(self._scripts.client)
            return
        except BaseException:
            log.exception("claim batch for %s failed unexpectedly", campaign_id)
            self._fail(items, Problem("The claim could not be decided"))
            raise
        self._health.ok()
        REDIS_ROUNDTRIP.observe(time.perf_counter() - started)
        REDIS_BATCH.observe(len(items))
        for (_, fut), verdict in zip(items, verdicts, strict=True):
            if not fut.done():
                fut.set_result(verdict)

    @staticmethod
    def _fail(items: list[tuple[ClaimArgs, asyncio.Future[Verdict]]], e: Exception) -> None:
        """Every waiting claim gets an answer, whatever happened to its batch."""
        for _, fut in items:
            if not fut.done():
                fut.set_exception(e)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
