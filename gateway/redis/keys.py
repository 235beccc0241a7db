"""The Redis key layout. Every key of one campaign carries the hash tag `{c:<id>}`, so each
script touches one slot and the same code runs on Redis Cluster."""

from __future__ import annotations

from typing import NamedTuple

CAMPAIGNS = "fc:campaigns"  # set of campaign ids, for listing
# pub/sub channel: "changed <id>" | "soldout <id>" | "status <id> <version> <status>"
#                 | "restock <id> <version> <remaining> <total>"
#                 | "roundout <id> <round> <version>" (that round sold out, not the campaign)
CHANGES = "fc:changes"
AUDIT = "fc:audit"  # stream: admin actions on their way to the store's audit_log
# blocklists: a hash per kind (user | device | ip: value -> entry JSON), a version bumped by
# every change, and the channel that carries "<version> add|del <kind> <value>"
BLOCKS = "fc:block:{kind}"
BLOCKS_VERSION = "fc:block:version"
BLOCKS_CHANNEL = "fc:blocks"


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

    @classmethod
    def of(cls, campaign_id: str) -> CampaignKeys:
        p = f"fc:{{c:{campaign_id}}}:"
        return cls(*(p + name for name in cls._fields))
