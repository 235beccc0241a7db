"""The Redis key layout. Every key of one campaign carries the hash tag `{c:<id>}`, so each
script touches one slot and the same code runs on Redis Cluster. A campaign split into
shards keeps shard 0 there and shard k under `{c:<id>:<k>}`, a slot of its own."""

from __future__ import annotations

import zlib
from typing import NamedTuple

CAMPAIGNS = "fc:campaigns"  # set of campaign ids, for listing
# pub/sub channel: "changed <id>" | "soldout <id>" | "status <id> <version> <status>"
#                 | "restock <id> <version> <remaining> <total>"
#                 | "roundout <id> <round> <version>" (that round sold out, not the campaign)
CHANGES = "fc:changes"
AUDIT = "fc:audit"  # stream: admin actions on their way to the store's audit_log
# blocklists: a hash per kind (user | device | ip: value -> entry JSON), a version bumped by
# every change, and the channel that carries "<version> add|del <kind> <value>"
# (one hash tag: a change and its version bump go to one slot, also on a cluster)
BLOCKS = "fc:{{block}}:{kind}"
BLOCKS_VERSION = "fc:{block}:version"
BLOCKS_CHANNEL = "fc:blocks"
# where the scripts of shards 1.. publish: their numbers are a shard's, not the campaign's
SHARD_CHANNEL = "fc:shard-changes"


class CampaignKeys(NamedTuple):
    meta: str  # hash: status, window, limits, remaining, total, seq, version, spec, r_*
    users: str  # hash user -> grants
    devices: str  # hash device_h -> grants
    phones: str  # hash phone_h -> grants
    ips: str  # hash ip -> grants
    grants: str  # hash user -> "seq:ms,seq:ms"
    idem: str  # hash "user\nkey" -> "seq:ms"
    idem_exp: str  # zset "user\nkey" by expiry ms
    events: str  # stream: the claim outbox
    dead: str  # stream: events the writer gave up on, with the reason
    room: str  # zset: the waiting room, user by queue score
    subnets: str  # hash network (IPv4 /24, IPv6 /48) -> grants; counted under per_subnet
    round_users: str  # hash "round:user" -> grants in that round (rounds campaigns)
    codes: str  # set: keyed hashes of the redemption codes not yet used
    code_misses: str  # hash user -> "minute:wrong codes" (redemption-code campaigns)
    transfers: str  # hash: units this shard lent, transfer id -> "to_shard:n:ms"
    received: str  # zset: transfer ids this shard took in, by ms

    @classmethod
    def of(cls, campaign_id: str, shard: int = 0) -> CampaignKeys:
        tag = f"c:{campaign_id}" if shard == 0 else f"c:{campaign_id}:{shard}"
        p = f"fc:{{{tag}}}:"
        return cls(*(p + name for name in cls._fields))


def home_shard(user_id: str, shards: int) -> int:
    """The shard that holds a user's records: stable across processes and restarts."""
    return 0 if shards <= 1 else zlib.crc32(user_id.encode()) % shards
