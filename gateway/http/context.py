"""The per-app bundle of resources handlers use, under one typed AppKey."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from gateway.admission.guard import Admission
from gateway.admission.waitingroom import RoomCache
from gateway.http.peer import PeerResolver
from gateway.identity import Verifier
from gateway.redis.batcher import ClaimBatcher
from gateway.redis.campaigns import CampaignViews
from gateway.redis.client import RedisClient
from gateway.redis.health import RedisHealth
from gateway.redis.scripts import Scripts
from gateway.settings import Settings
from gateway.winners import Winners


@dataclass
class Gateway:
    settings: Settings
    client: RedisClient
    scripts: Scripts
    health: RedisHealth
    views: CampaignViews
    batcher: ClaimBatcher
    verifier: Verifier
    admission: Admission
    room: RoomCache
    peers: PeerResolver
    winners: Winners = field(default_factory=Winners)


GATEWAY = web.AppKey("gateway", Gateway)
