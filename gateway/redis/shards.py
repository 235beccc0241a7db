"""Hot-campaign stock shards: the stock split, the shards' numbers, moving stock to a shard
that ran out (lend, receive, settle: three single-slot scripts) and finishing moves a crashed
gateway left, and the one check that may call a sharded campaign sold out."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any, NamedTuple

from gateway.redis.client import RedisClient
from gateway.redis.keys import CampaignKeys
from gateway.redis.scripts import Scripts

STUCK_MS = 2000  # a transfer this old was left by a crashed mover: finish it


def split(quantity: int, shards: int) -> list[int]:
    """`quantity` units over `shards` shards, the first ones taking the remainder."""
    return [quantity // shards + (1 if k < quantity % shards else 0) for k in range(shards)]


def shard_fields(fields: Mapping[str, str | int], shards: int) -> list[dict[str, str | int]]:
    """The meta of each shard: the campaign's, with its share of the stock; only shard 0
    keeps the spec (the campaign view and the writer read it there)."""
    shares = split(int(fields["remaining"]), shards)
    out = []
    for k, share in enumerate(shares):
        f = {**fields, "remaining": share, "total": share, "shards": shards, "shard": k}
        if k > 0:
            f.pop("spec", None)
        out.append(f)
    return out


class ShardState(NamedTuple):
    remaining: int
    total: int
    lent: int  # units on their way to another shard
    seq: int  # grants made on this shard
    unwritten: int
    moves: int  # bumped by every lend, receive and settle
    version: int  # bumped by every status change and restock


_FIELDS = ("remaining", "total", "lent", "seq", "unwritten", "moves", "version")


async def read_shards(client: RedisClient, campaign_id: str, shards: int) -> list[ShardState]:
    async with client.pipeline(transaction=False) as pipe:
        for k in range(shards):
            pipe.hmget(CampaignKeys.of(campaign_id, k).meta, _FIELDS)
        rows: list[Any] = await pipe.execute()
    return [ShardState(*(int(v or 0) for v in row)) for row in rows]


def stock_left(states: list[ShardState]) -> int:
    return sum(s.remaining + s.lent for s in states)


async def confirmed_empty(
    client: RedisClient, campaign_id: str, shards: int, first: list[ShardState] | None = None
) -> bool:
    """True when every shard was empty, with nothing lent, at one instant: two reads agree
    (stock only ever grows through a receive or a restock, which bump moves or version)."""
    a = first or await read_shards(client, campaign_id, shards)
    if stock_left(a):
        return False
    b = await read_shards(client, campaign_id, shards)
    return not stock_left(b) and [(s.moves, s.version) for s in a] == [
        (s.moves, s.version) for s in b]


class ShardMover:
    """Moves stock to a shard that ran out; one per worker. lua/lend.lua takes units out of
    a donor and records them as lent, lua/receive.lua adds them to the home shard once per
    transfer id, lua/settle.lua forgets the transfer. A crash between the steps leaves the
    units in the donor's `lent` count and transfer record, never lost: `recover` finishes
    the move (receive is idempotent), and while any unit is lent nobody hears sold_out."""

    def __init__(self, scripts: Scripts) -> None:
        self.scripts = scripts

    async def borrow(self, campaign_id: str, home: int, shards: int, want: int) -> int:
        """Up to `want` units from other shards into `home`; the number moved."""
        moved = 0
        start = secrets.randbelow(shards - 1)
        for i in range(shards - 1):
            donor = (home + 1 + (start + i) % (shards - 1)) % shards
            tid = f"{donor}>{home}:{secrets.token_hex(8)}"
            n = (await self.scripts.lend(campaign_id, donor, want - moved, home, tid))[0]
            if n:
                await self.scripts.receive(campaign_id, home, tid, n)
                await self.scripts.settle(campaign_id, donor, tid)
                moved += n
                if moved >= want:
                    break
        return moved

    async def recover(self, campaign_id: str, shards: int, stuck_ms: int = STUCK_MS) -> int:
        """Finish transfers older than `stuck_ms` (left by a mover that died); the number
        finished."""
        client = self.scripts.client
        sec, usec = await client.time()
        now = sec * 1000 + usec // 1000
        done = 0
        for k in range(shards):
            key = CampaignKeys.of(campaign_id, k).transfers
            records: dict[Any, Any] = await client.hgetall(key)
            for tid, rec in records.items():
                to, n, ms = (int(x) for x in str(rec).split(":"))
                if now - ms >= stuck_ms:
                    await self.scripts.receive(campaign_id, to, str(tid), n)
                    done += await self.scripts.settle(campaign_id, k, str(tid))
        return done
