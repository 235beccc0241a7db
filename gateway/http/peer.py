"""The caller's address: the socket peer, or — when the peer is a trusted proxy
(FLASHCLAIM_TRUSTED_PROXIES) — the right-most X-Forwarded-For hop that is not one; and the
network it belongs to for per-subnet limits."""

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

    def is_trusted(self, addr: str) -> bool:
        return bool(self.trusted) and self._is_trusted(addr)

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


SUBNET_V4, SUBNET_V6 = 24, 48


@lru_cache(maxsize=65536)
@lru_cache(maxsize=1 << 16)  # parsing costs ~7 µs, a sizeable part of a claim's budget
def subnet(addr: str) -> str:
    """The network `addr` counts under: its IPv4 /24, or its IPv6 /48 (one site's usual
    allocation: a home or office gets a /48 or /56, so rotating /64s does not escape it).
    IPv4-mapped IPv6 counts as IPv4; "" for what is not an address."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return ""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = SUBNET_V4 if ip.version == 4 else SUBNET_V6
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))
