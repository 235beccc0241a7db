"""Blocklists of users, devices (keyed hashes) and addresses/CIDRs: one Redis hash per kind,
changed with a version bump and a pub/sub message, mirrored in every worker's memory (kept
fresh by the messages plus a periodic version check, since pub/sub is at-most-once)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from redis.exceptions import RedisError

from gateway.redis.client import RedisClient
from gateway.redis.keys import BLOCKS, BLOCKS_CHANNEL, BLOCKS_VERSION

log = logging.getLogger(__name__)

Kind = Literal["user", "device", "ip"]
KINDS: tuple[Kind, ...] = ("user", "device", "ip")
KEYS: dict[Kind, str] = {k: BLOCKS.format(kind=k) for k in KINDS}
VERSION, CHANNEL = BLOCKS_VERSION, BLOCKS_CHANNEL
REFRESH_S = 1.0


def normalize_ip(value: str) -> str:
    """An address or CIDR in canonical form ("10.1.2.3/24" -> "10.1.2.0/24"); a single
    address keeps no prefix. Raises ValueError for anything else."""
    net = ipaddress.ip_network(value.strip(), strict=False)
    single = net.prefixlen == net.max_prefixlen
    return str(net.network_address) if single else str(net)


class BlockSet:
    """The blocked values in memory; `match()` is the hot-path question."""

    def __init__(self) -> None:
        self.users: set[str] = set()
        self.devices: set[str] = set()
        self.ips: set[str] = set()
        # per IP version and prefix length: the networks as integers, for one set lookup
        # per prefix length in use instead of a scan over every entry
        self._nets: dict[tuple[int, int], set[int]] = {}

    def replace(self, values: Mapping[Kind, Iterable[str]]) -> None:
        self.users = set(values["user"])
        self.devices = set(values["device"])
        self.ips = set()
        self._nets = {}
        for v in values["ip"]:
            self.add("ip", v)

    def add(self, kind: Kind, value: str) -> None:
        if kind == "user":
            self.users.add(value)
        elif kind == "device":
            self.devices.add(value)
        else:
            self.ips.add(value)
            net = ipaddress.ip_network(value)
            self._nets.setdefault((net.version, net.prefixlen), set()).add(
                int(net.network_address))

    def discard(self, kind: Kind, value: str) -> None:
        if kind == "user":
            self.users.discard(value)
        elif kind == "device":
            self.devices.discard(value)
        elif value in self.ips:
            self.ips.discard(value)
            net = ipaddress.ip_network(value)
            nets = self._nets.get((net.version, net.prefixlen))
            if nets is not None:
                nets.discard(int(net.network_address))
                if not nets:
                    del self._nets[(net.version, net.prefixlen)]

    def match(self, user_id: str, device_h: str, ip: str) -> Kind | None:
        """Which list the caller is on, if any."""
        if user_id in self.users:
            return "user"
        if device_h and device_h in self.devices:
            return "device"
        if self._nets and ip:
            try:
                addr = ipaddress.ip_address(ip)
            except ValueError:
                return None
            if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
                addr = addr.ipv4_mapped
            n, bits = int(addr), addr.max_prefixlen
            for (version, prefix), nets in self._nets.items():
                if version == addr.version and (n >> (bits - prefix)) << (bits - prefix) in nets:
                    return "ip"
        return None


async def change(
    client: RedisClient, op: Literal["add", "del"], kind: Kind, value: str, entry: str = ""
) -> bool:
    """Add (or update) or delete one entry, bump the version and tell every worker.
    True when the entry was new (add) or was there (del)."""
    # no MULTI (a cluster pipeline may not offer one): a reader that sees the new version
    # reloads everything, and the change is in place before the bump
    async with client.pipeline(transaction=False) as pipe:
        if op == "add":
            pipe.hset(KEYS[kind], value, entry)
        else:
            pipe.hdel(KEYS[kind], value)
        pipe.incr(VERSION)
        done, version = await pipe.execute()
    await client.publish(CHANNEL, f"{version} {op} {kind} {value}")
    return bool(done)


async def entries(client: RedisClient, kind: Kind) -> dict[str, str]:
    raw: dict[Any, Any] = await client.hgetall(KEYS[kind])
    return {str(k): str(v) for k, v in raw.items()}


class BlocklistView:
    """This worker's copy; `run()` keeps it fresh until `close()`."""

    def __init__(self, client: RedisClient) -> None:
        self._client = client
        self.blocks = BlockSet()
        self.version = -1  # unknown: the first check loads everything
        self._stop = asyncio.Event()

    def match(self, user_id: str, device_h: str, ip: str) -> Kind | None:
        return self.blocks.match(user_id, device_h, ip)

    async def reload(self) -> None:
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.get(VERSION)
            for kind in KINDS:
                pipe.hkeys(KEYS[kind])
            version, *lists = await pipe.execute()
        self.blocks.replace(dict(zip(KINDS, lists, strict=True)))
        self.version = int(version or 0)

    async def check(self) -> None:
        """Reload when the version moved past what the messages told us."""
        if int(await self._client.get(VERSION) or 0) != self.version:
            await self.reload()

    async def _on_message(self, data: str) -> None:
        version, op, kind, value = data.split(" ", 3)
        if kind not in KINDS:
            return
        k: Kind = kind
        if op == "add":
            self.blocks.add(k, value)
        else:
            self.blocks.discard(k, value)
        if int(version) == self.version + 1:
            self.version += 1
        else:  # a message was lost or came out of order: take the whole lists
            await self.reload()

    async def run(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CHANNEL)
                await self.reload()  # whatever changed while we were not subscribed
                backoff = 0.05
                next_check = time.monotonic() + REFRESH_S
                while not self._stop.is_set():
                    timeout = max(0.0, next_check - time.monotonic())
                    msg = await pubsub.get_message(timeout=timeout)
                    if msg is not None and msg["type"] == "message":
                        await self._on_message(str(msg["data"]))
                    if time.monotonic() >= next_check:
                        await self.check()
                        next_check = time.monotonic() + REFRESH_S
            except (RedisError, OSError) as e:
                log.warning("blocklist lost Redis: %r; retrying in %.2fs", e, backoff)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), backoff)
                backoff = min(backoff * 2, 1.0)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def close(self) -> None:
        self._stop.set()
