"""Release rehearsal plans, shared by the runner and the Locust scenarios: the knobs of a run
(LOADTEST_* in the scenario's environment), the campaign each scenario creates, and the
gateway settings it wants when the runner starts one."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
from typing import Any

SCENARIOS = ("release", "hammer", "bots", "waiting_room", "mixed")


@dataclasses.dataclass(frozen=True)
class Knobs:
    scenario: str
    campaign: str = ""  # the campaign under test
    out: str = "loadtest/reports"  # this run's report directory
    t0: float = 0.0  # epoch seconds of the release (the campaign's start)
    users: int = 0  # peak simulated users; 0: the scenario's default
    hold_s: float = 20.0  # seconds at the peak after T0
    drain_s: float = 5.0  # seconds of ramp-down after the hold
    stock: int = 0  # 0: the scenario's default
    bot_factor: float = 100.0  # bots' request rate per identity over the humans'
    controls: int = 1  # bots: 0 drops the device/address limits and the request rates

    def env(self) -> dict[str, str]:
        return {f"LOADTEST_{f.name.upper()}": str(getattr(self, f.name))
                for f in dataclasses.fields(self)}

    @classmethod
    def from_env(cls) -> Knobs:
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = os.environ.get(f"LOADTEST_{f.name.upper()}")
            if raw is not None:
                kind = str if f.default is dataclasses.MISSING else type(f.default)
                values[f.name] = kind(raw)
        if "scenario" not in values:
            raise SystemExit("LOADTEST_SCENARIO is not set: run `python -m loadtest.run NAME`")
        return cls(**values)

    @property
    def peak(self) -> int:
        return self.users or DEFAULT_USERS[self.scenario]

    @property
    def units(self) -> int:
        return self.stock or DEFAULT_STOCK[self.scenario]


DEFAULT_USERS = {"release": 64, "hammer": 48, "bots": 24, "waiting_room": 200, "mixed": 48}
DEFAULT_STOCK = {"release": 1_000_000, "hammer": 2_000, "bots": 50, "waiting_room": 1_000,
                 "mixed": 3_000}

# bots: each farm drives this many identities from these few devices and addresses
BOT_FARMS, BOT_IDENTITIES, BOT_DEVICES, BOT_ADDRESSES = 2, 25, 2, 3
HUMAN_CLICKS = 1.5  # a human clicks once or twice
ROOM_RATE = 100  # waiting_room: claims admitted per second
MIXED_RESTOCK = 1_000  # mixed: units the operator adds mid-release

# what the gateway needs for each scenario (FLASHCLAIM_* names): addresses come from
# X-Forwarded-For, so every simulated client can pose as its own address
GATEWAY_ENV: dict[str, dict[str, str]] = {
    "release": {}, "hammer": {}, "waiting_room": {}, "mixed": {},
    "bots": {"FLASHCLAIM_IP_RATE_PER_S": "5", "FLASHCLAIM_IP_BURST": "10"},
}
NO_CONTROLS_ENV = {"FLASHCLAIM_IP_RATE_PER_S": "0", "FLASHCLAIM_USER_RATE_PER_S": "0"}
TRUSTED_PROXY = "127.0.0.1"


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat()


def campaign_spec(k: Knobs) -> dict[str, Any]:
    """The campaign a scenario rehearses, starting at T0."""
    spec: dict[str, Any] = {
        "id": k.campaign, "name": f"Rehearsal: {k.scenario}", "stock": k.units,
        "starts_at": _iso(k.t0), "ends_at": _iso(k.t0 + 3600),
        "limits": {"per_user": 1},
        "coupons": [{"kind": "threshold", "value": 3000, "threshold": 10000,
                     "currency": "CNY", "valid_days": 30}],
    }
    if k.scenario == "hammer":
        spec["limits"] = {"per_user": 2}
    elif k.scenario == "bots" and k.controls:
        spec["limits"] = {"per_user": 1, "per_device": 1, "per_ip": 2}
    elif k.scenario == "waiting_room":
        spec["admission"] = {"admit_per_s": ROOM_RATE, "burst": ROOM_RATE // 10,
                             "waiting_room": True}
    return spec
