"""Claim micro-batching: claims that arrive in one event-loop tick go to Redis as one
`claim.lua` call per campaign, and each request awaits its own verdict. A failed call fails
only its own claims (503). Single-flight: identical claims in flight (one user's repeat
clicks) share one verdict instead of each going to Redis. A sharded campaign's claims go to
each user's home shard; those it finds out of stock get stock moved in from other shards
(gateway/redis/shards.py) and are decided again."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

from redis.exceptions import ConnectionError, RedisError, ResponseError

from gateway.domain import Outcome
from gateway.errors import Problem, Unavailable
from gateway.metrics import REDIS_BATCH, REDIS_ERRORS, REDIS_ROUNDTRIP
from gateway.redis.client import drop_idle
from gateway.redis.health import RedisHealth
from gateway.redis.keys import CHANGES, home_shard
from gateway.redis.scripts import ClaimArgs, Scripts
from gateway.redis.shards import ShardMover, ShardState, confirmed_empty, read_shards

log = logging.getLogger(__name__)

MAX_BATCH = 256
RESCUE_S = 1.0  # the longest a sharded claim waits for stock in transit before a 503
RECOVER_S = 1.0  # how often a worker looks for transfers a crashed mover left
NO_NEWS = 2**62  # a shard's verdict says nothing about the campaign's stock left
_TRANSIENT = ("OOM", "BUSY", "LOADING", "MASTERDOWN", "READONLY", "TRYAGAIN", "CLUSTERDOWN")


class Verdict(NamedTuple):
    outcome: Outcome
    data: str  # "seq:ms" for grants; the user's grants for limits; starts ms for not_started
    now_ms: int  # Redis TIME of the decision
    remaining: int  # stock left after the batch
    version: int  # the campaign's meta version the batch saw


def redis_unavailable() -> Unavailable:
    return Unavailable("Claims are unavailable right now; retry shortly", retry_after=1)


Item = tuple[ClaimArgs, "asyncio.Future[Verdict]"]


class ClaimBatcher:
    def __init__(
        self, scripts: Scripts, health: RedisHealth, idem_ttl_ms: int, backlog_max: int,
        shards_of: Callable[[str], int] = lambda _: 1,
    ) -> None:
        self._scripts = scripts
        self._shards_of = shards_of  # a campaign's shard count, from the worker's view
        self._mover = ShardMover(scripts)
        self._recovered: dict[str, float] = {}
        self._health = health
        self._idem_ttl_ms = idem_ttl_ms
        self._backlog_max = backlog_max
        # (campaign, shard, shards) -> claims of this tick
        self._pending: dict[tuple[str, int, int], list[Item]] = {}
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
        (`in_flight`), and the caller answers them as a second claim would be answered.
        (The entry goes when the verdict is set: `_settle`.)"""
        fut = self._submit(campaign_id, claim)
        if shared and not fut.done():
            self._inflight[(campaign_id, claim)] = fut
        return fut

    def _submit(self, campaign_id: str, claim: ClaimArgs) -> asyncio.Future[Verdict]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Verdict] = loop.create_future()
        if self._health.cooling_down:
            fut.set_exception(redis_unavailable())
            return fut
        shards = self._shards_of(campaign_id)
        key = (campaign_id, home_shard(claim[0], shards), shards)
        self._pending.setdefault(key, []).append((claim, fut))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, {}
        for (campaign_id, shard, shards), items in pending.items():
            for i in range(0, len(items), MAX_BATCH):
                task = asyncio.ensure_future(
                    self._run(campaign_id, shard, shards, items[i : i + MAX_BATCH]))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _call(
        self, campaign_id: str, claims: Sequence[ClaimArgs], shard: int | None
    ) -> list[Verdict]:
        raw = await self._scripts.claim(
            campaign_id, claims, self._idem_ttl_ms, self._backlog_max, shard)
        now_ms, remaining, version = int(raw[0]), int(raw[1]), int(raw[2])
        if shard is not None:
            remaining, version = NO_NEWS, 0
        return [Verdict(Outcome(int(raw[3 + 2 * i])), str(raw[4 + 2 * i]), now_ms, remaining,
                        version) for i in range(len(claims))]

    async def _run(self, campaign_id: str, shard: int, shards: int, items: list[Item]) -> None:
        started = time.perf_counter()
        claims = [c for c, _ in items]
        try:
            verdicts = await self._call(campaign_id, claims, shard if shards > 1 else None)
        except (RedisError, OSError) as e:
            self._health.failed()
            REDIS_ERRORS.labels(type(e).__name__).inc()
            if isinstance(e, ResponseError) and not str(e).startswith(_TRANSIENT):
                log.error("claim script error for %s: %r", campaign_id, e)
            else:
                log.warning("claim batch for %s failed: %r", campaign_id, e)
            self._settle(campaign_id, items, [redis_unavailable()] * len(items))
            if isinstance(e, ConnectionError | OSError):
                # Redis went away: its other pooled connections are dead too
                await drop_idle(self._scripts.client)
            return
        except BaseException:
            log.exception("claim batch for %s failed unexpectedly", campaign_id)
            self._settle(campaign_id, items,
                         [Problem("The claim could not be decided")] * len(items))
            raise
        self._health.ok()
        REDIS_ROUNDTRIP.observe(time.perf_counter() - started)
        REDIS_BATCH.observe(len(items))
        results: list[Verdict | Exception] = list(verdicts)
        if any(v.outcome == Outcome.SOLD_OUT for v in verdicts) and shards > 1:
            results = await self._rescue(campaign_id, shard, shards, claims, verdicts)
        self._settle(campaign_id, items, results)

    def _settle(self, campaign_id: str, items: list[Item],
                results: Sequence[Verdict | Exception]) -> None:
        """Every waiting claim gets its answer, and leaves the in-flight table."""
        inflight = self._inflight
        for (claim, fut), result in zip(items, results, strict=True):
            if inflight and inflight.get((campaign_id, claim)) is fut:
                del inflight[(campaign_id, claim)]
            if fut.done():
                continue
            if isinstance(result, Exception):
                fut.set_exception(result)
            else:
                fut.set_result(result)

    async def _rescue(
        self, campaign_id: str, home: int, shards: int, claims: list[ClaimArgs],
        verdicts: list[Verdict],
    ) -> list[Verdict | Exception]:
        """The home shard ran out: move stock in from other shards and decide its sold-out
        claims again, until they are decided or every shard is empty."""
        results: list[Verdict | Exception] = list(verdicts)
        todo = [i for i, v in enumerate(verdicts) if v.outcome == Outcome.SOLD_OUT]
        deadline = time.monotonic() + RESCUE_S
        client = self._scripts.client
        try:
            while todo:
                if not await self._mover.borrow(campaign_id, home, shards, len(todo)):
                    first = await read_shards(client, campaign_id, shards)
                    if await confirmed_empty(client, campaign_id, shards, first):
                        await client.publish(CHANGES, f"soldout {campaign_id}")
                        for i in todo:
                            results[i] = verdicts[i]._replace(remaining=0,
                                                              version=first[0].version)
                        return results
                    if time.monotonic() > deadline:
                        raise redis_unavailable()
                    await self._recover(campaign_id, shards, first)
                    await asyncio.sleep(0.005)  # units in transit land in a moment
                again = await self._call(campaign_id, [claims[i] for i in todo], home)
                for i, v in zip(todo, again, strict=True):
                    results[i] = v
                todo = [i for i, v in zip(todo, again, strict=True)
                        if v.outcome == Outcome.SOLD_OUT]
        except (RedisError, OSError, Unavailable) as e:
            if not isinstance(e, Unavailable):
                self._health.failed()
                REDIS_ERRORS.labels(type(e).__name__).inc()
                log.warning("moving stock to shard %d of %s failed: %r", home, campaign_id, e)
            for i in todo:
                results[i] = redis_unavailable()
        return results

    async def _recover(self, campaign_id: str, shards: int, states: list[ShardState]) -> None:
        """Units lent and not landing: finish transfers a crashed mover left, now and then."""
        if not any(s.lent for s in states):
            return
        now = time.monotonic()
        if now - self._recovered.get(campaign_id, 0.0) < RECOVER_S:
            return
        self._recovered[campaign_id] = now
        if await self._mover.recover(campaign_id, shards):
            log.warning("finished stock transfers of %s left by a crashed mover", campaign_id)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
