"""Claim events: the versioned record each grant appends to its campaign's stream (the
outbox the writer drains and upstream services subscribe to), and `subscribe()`, an
at-least-once async iterator over them for Python subscribers. Schema: docs/events.md."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import msgspec
from redis.exceptions import ResponseError

from gateway.redis.client import RedisClient, socket_timeout
from gateway.redis.keys import CampaignKeys

EVENT_VERSION = 1


class ClaimEvent(msgspec.Struct, frozen=True):
    """One grant, version 1. `granted_at` is Redis TIME in ms; `device` and `phone` are
    keyed hashes; `n` is this user's n-th grant in the campaign. Added within v1 (absent
    from older entries, hence empty by default): `region` from the identity token, and
    `validity`, each coupon's `from/until` in ms in package order, comma-separated;
    `round` (campaigns with rounds: the round of the grant, 0-based) and `code` (campaigns
    with redemption codes: the keyed hash of the code used)."""

    v: int
    claim_id: str
    campaign_id: str
    user_id: str
    n: int
    seq: int
    granted_at: int
    device: str = ""
    phone: str = ""
    ip: str = ""
    channel: str = ""
    region: str = ""
    validity: str = ""
    round: int | None = None
    code: str = ""

    def coupon_validity(self) -> list[tuple[int, int]]:
        """`validity` as (valid_from_ms, valid_until_ms) per coupon; empty for old events."""
        out = []
        for part in filter(None, self.validity.split(",")):
            start, _, until = part.partition("/")
            out.append((int(start), int(until)))
        return out


def decode_event(fields: dict[Any, Any]) -> ClaimEvent:
    """Raises msgspec.ValidationError for an entry that is not a claim event."""
    ev = msgspec.convert(fields, ClaimEvent, strict=False)
    if ev.v != EVENT_VERSION:
        raise msgspec.ValidationError(f"unsupported event version {ev.v}")
    return ev


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


async def ensure_group(client: RedisClient, stream: str, group: str, from_start: bool) -> None:
    try:
        await client.xgroup_create(stream, group, id="0" if from_start else "$", mkstream=True)
    except ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise


@dataclass(frozen=True)
class Delivery:
    event: ClaimEvent
    entry_id: str
    _client: RedisClient
    _stream: str
    _group: str

    async def ack(self) -> None:
        await self._client.xack(self._stream, self._group, self.entry_id)


async def subscribe(
    client: RedisClient,
    campaign_id: str,
    group: str,
    *,
    consumer: str | None = None,
    from_start: bool = False,
    batch: int = 100,
    block_ms: int = 1000,
) -> AsyncGenerator[Delivery, None]:
    """Yields the campaign's claim events in stream order through consumer group `group`:
    first this consumer's unacknowledged ones, then new ones. Ack each after handling it;
    an unacked event comes again (dedupe on `claim_id`). A sharded campaign has one stream
    per shard: each is in order, and they are read in turn (order by `seq` across them is
    not guaranteed)."""
    shards = int(await client.hget(CampaignKeys.of(campaign_id).meta, "shards") or 1)
    streams = [CampaignKeys.of(campaign_id, k).events for k in range(shards)]
    consumer = consumer or consumer_name()
    for stream in streams:
        await ensure_group(client, stream, group, from_start)
    timeout_s = socket_timeout(client)
    if timeout_s:  # a blocking read must end before the client gives up on the socket
        block_ms = max(1, min(block_ms, int(timeout_s * 1000 / 2)))
    cursors = dict.fromkeys(streams, "0")  # our own pending entries first, page by page
    while True:
        got = False
        for stream in streams:
            cursor = cursors[stream]
            # one stream blocks on Redis; several are polled in turn (no read spans slots)
            block = block_ms if cursor == ">" and len(streams) == 1 else None
            reply: Any = await client.xreadgroup(
                group, consumer, {stream: cursor}, count=batch, block=block
            )
            entries: list[Any] = reply[0][1] if reply else []
            if cursor != ">" and not entries:
                cursors[stream] = ">"
                got = True  # read the new ones at once
                continue
            got = got or bool(entries)
            for entry_id, fields in entries:
                if fields:
                    yield Delivery(decode_event(fields), str(entry_id), client, stream, group)
            if cursor != ">":
                # the next page of our pending entries (those the caller left unacked stay)
                cursors[stream] = str(entries[-1][0])
        if not got and len(streams) > 1:
            await asyncio.sleep(min(block_ms, 50) / 1000)
