"""The Lua scripts of `lua/`, registered once per client and called through typed wrappers;
redis-py's Script object reloads a script after NOSCRIPT."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gateway.redis.client import RedisClient
from gateway.redis.keys import CHANGES, SHARD_CHANNEL, CampaignKeys

# user, device_h, phone_h, ip, idem_key, channel, subnet, region,
# code_h (redemption code's keyed hash or "")
ClaimArgs = tuple[str, str, str, str, str, str, str, str, str]


class Scripts:
    def __init__(self, client: RedisClient, lua_dir: Path) -> None:
        def load(name: str) -> Any:
            return client.register_script((lua_dir / f"{name}.lua").read_text())

        self._claim = load("claim")
        self._create = load("create")
        self._set_status = load("set_status")
        self._restock = load("restock")
        self._ack = load("ack")
        self._update = load("update")
        self._room_enter = load("room_enter")
        self._lend = load("lend")
        self._receive = load("receive")
        self._settle = load("settle")
        self._all = (self._claim, self._create, self._set_status, self._restock, self._ack,
                     self._update, self._room_enter, self._lend, self._receive,
                     self._settle)
        self.client = client

    async def load_all(self) -> None:
        """SCRIPT LOAD every script, so readiness means the scripts are there."""
        for s in self._all:
            s.sha = await self.client.script_load(s.script)

    async def claim(
        self, campaign_id: str, claims: Sequence[ClaimArgs], idem_ttl_ms: int, backlog_max: int,
        shard: int | None = None,
    ) -> list[Any]:
        """`shard`: one shard of a sharded campaign, which must not publish `soldout`."""
        channel = CHANGES if shard is None else SHARD_CHANNEL
        args: list[str | int] = [campaign_id, channel, idem_ttl_ms, backlog_max]
        for c in claims:
            args.extend(c)
        k = CampaignKeys.of(campaign_id, shard or 0)
        keys = [k.meta, k.users, k.devices, k.phones, k.ips, k.grants, k.idem, k.idem_exp, k.events,
                k.subnets, k.round_users, k.codes, k.code_misses]
        result: list[Any] = await self._claim(keys=keys, args=args)
        return result

    async def create(
        self, campaign_id: str, fields: Mapping[str, str | int], shard: int = 0
    ) -> bool:
        args: list[str | int] = [CHANGES if shard == 0 else SHARD_CHANNEL, campaign_id]
        for k, v in fields.items():
            args.extend((k, v))
        created = await self._create(keys=[CampaignKeys.of(campaign_id, shard).meta], args=args)
        return bool(created)

    async def set_status(self, campaign_id: str, status: str, shard: int = 0) -> int:
        keys = [CampaignKeys.of(campaign_id, shard).meta]
        # every shard carries the status; the same message from each is applied once
        return int(await self._set_status(keys=keys, args=[CHANGES, campaign_id, status]))

    async def restock(
        self, campaign_id: str, quantity: int, max_total: int = 0, shard: int | None = None
    ) -> list[int]:
        """`max_total`: the most units put up in all (a budget cap; 0: none). `shard`: one
        shard's part of a sharded campaign's restock (published by the caller once every
        shard has it)."""
        keys = [CampaignKeys.of(campaign_id, shard or 0).meta]
        channel = CHANGES if shard is None else SHARD_CHANNEL
        result = await self._restock(keys=keys, args=[channel, campaign_id, quantity, max_total])
        return [int(x) for x in result]

    async def update(
        self, campaign_id: str, spec_json: str, fields: Mapping[str, str | int], version: int
    ) -> list[int]:
        """A live change if the meta is still at `version`: {1, new version, seq} | {0}
        unknown | {-1} ended | {-2} version moved (lua/update.lua)."""
        args: list[str | int] = [CHANGES, campaign_id, version, spec_json]
        for k, v in fields.items():
            args.extend((k, v))
        result = await self._update(keys=[CampaignKeys.of(campaign_id).meta], args=args)
        return [int(x) for x in result]

    async def lend(self, campaign_id: str, shard: int, want: int, to_shard: int,
                   transfer_id: str) -> list[int]:
        k = CampaignKeys.of(campaign_id, shard)
        result = await self._lend(keys=[k.meta, k.transfers], args=[want, to_shard, transfer_id])
        return [int(x) for x in result]

    async def receive(self, campaign_id: str, shard: int, transfer_id: str, n: int) -> int:
        k = CampaignKeys.of(campaign_id, shard)
        return int(await self._receive(keys=[k.meta, k.received], args=[transfer_id, n]))

    async def settle(self, campaign_id: str, shard: int, transfer_id: str) -> int:
        k = CampaignKeys.of(campaign_id, shard)
        return int(await self._settle(keys=[k.meta, k.transfers], args=[transfer_id]))


    async def room_enter(self, campaign_id: str, user_id: str, shuffle_score: int) -> int:
        keys = CampaignKeys.of(campaign_id)
        score = await self._room_enter(keys=[keys.meta, keys.room],
                                       args=[user_id, shuffle_score])
        return int(float(score))

    async def ack(
        self, campaign_id: str, group: str, ids: Sequence[str], shard: int = 0
    ) -> int:
        keys = CampaignKeys.of(campaign_id, shard)
        return int(await self._ack(keys=[keys.events, keys.meta], args=[group, *ids]))
