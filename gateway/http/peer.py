"""The caller's address: the socket peer, or — when the peer is a trusted proxy
(FLASHCLAIM_TRUSTED_PROXIES) — the right-most X-Forwarded-For hop that is not one."""

from __future__ import annotations

import ipaddress
from functools import lru_cache

from aiohttp import web

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(spec: str) -> tuple[Network, ...]:
    """`"10.0.0.0/8, 127.0.0.1"` into networks; a bad entry raises ValueError naming it."""
    nets = []
    for part in spec.split(","):
        part = part.strip()
        if part:
            try:
                nets.append(ipaddress.ip_network(part, strict=False))
            except ValueError:
                raise ValueError(f"not an address or CIDR: {part!r}") from None
    return tuple(nets)


class PeerResolver:
    def __init__(self, trusted_proxies: str) -> None:
        self.trusted = parse_networks(trusted_proxies)
        # proxies are few and callers many: remember the verdict per address
        self._is_trusted = lru_cache(maxsize=4096)(self._check)

    def _check(self, addr: str) -> bool:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in net for net in self.trusted)

    def address(self, request: web.Request) -> str:
        peer = request.remote or ""
        if not self.trusted or not self._is_trusted(peer):
            return peer
        # Walk the hops from the nearest; the first one not ours is the caller (anything
        # further left was written by the caller and proves nothing).
        for hop in reversed(request.headers.getall("X-Forwarded-For", [])):
            for addr in reversed(hop.split(",")):
                addr = addr.strip()
                if not addr:
                    continue
                if not self._is_trusted(addr):
                    return addr if self._valid(addr) else peer
        return peer

    @staticmethod
    def _valid(addr: str) -> bool:
        try:
            ipaddress.ip_address(addr)
        except ValueError:
            return False
        return True
