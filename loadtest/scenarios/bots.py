"""bots: a few farms, each driving many identities from a few devices and addresses at
`bot_factor` times a human's request rate per identity, beside humans who click once or
twice. The verdict adds a fairness report: bots' share of grants against their share of
identities, which must be no larger (with per_device / per_ip limits and the per-address
and per-user rates on)."""

from __future__ import annotations

import itertools
import json
import random
from typing import Any

from locust import constant_throughput, task

from gateway.durable.verify import GrantSeen, Record, Seen, Tally
from loadtest import plan
from loadtest import rehearsal as r

K = r.knobs
BOT_USERS_PER_FARM = 6
_farms = itertools.count()
farms: dict[int, list[r.Person]] = {}  # this process's farms and their identities


class Bot(r.Claimant):
    """One of a farm's senders; the farm's identities share its devices and addresses."""

    fixed_count = plan.BOT_FARMS * BOT_USERS_PER_FARM
    # requests per identity: bot_factor times a human's clicks, spread over the hold
    wait_time = constant_throughput(
        K.bot_factor * plan.HUMAN_CLICKS * plan.BOT_IDENTITIES / K.hold_s / BOT_USERS_PER_FARM)

    def on_start(self) -> None:
        farm = next(_farms) % plan.BOT_FARMS
        if farm not in farms:
            net = f"203.0.{113 + farm}"
            farms[farm] = [
                r.Person.new("bot", dev=f"farm{farm}-dev{i % plan.BOT_DEVICES}",
                             ip=f"{net}.{i % plan.BOT_ADDRESSES + 1}")
                for i in range(plan.BOT_IDENTITIES)]
        self.pool = farms[farm]

    @task
    def fire(self) -> None:
        self.claim(random.choice(self.pool), name="claim [bot]")


class Human(r.Claimant):
    """A person arrives and clicks once; every other one clicks a second time, a moment
    later (a double click, or a retry after Retry-After); then the next person arrives."""

    wait_time = constant_throughput(1 / 3)  # a new person every ~3 s per simulated user
    clicks = itertools.cycle((1, 2))

    @task
    def visit(self) -> None:
        who = r.Person.new("human")
        for _ in range(next(self.clicks)):
            status, _, headers = self.claim(who, name="claim [human]")
            if status == 410:
                return
            self.pause(max(r.retry_after(headers), random.uniform(0.8, 1.6)))


class Bots(r.PhasedShape):
    idle = 0


def fairness(records: list[Record]) -> dict[str, Any]:
    ids: dict[str, set[str]] = {"bot": set(), "human": set()}
    grants: dict[str, set[str]] = {"bot": set(), "human": set()}
    requests = {"bot": 0, "human": 0}
    for rec in records:
        if isinstance(rec, Seen):
            ids.setdefault(rec.role, set()).add(rec.user)
        if isinstance(rec, GrantSeen):
            grants.setdefault(rec.role, set()).add(rec.claim_id)
        if isinstance(rec, Tally):
            requests[rec.role] = requests.get(rec.role, 0) + sum(rec.statuses.values())
    n_ids = sum(map(len, ids.values())) or 1
    n_grants = sum(map(len, grants.values())) or 1
    per_id = {k: requests[k] / max(1, len(ids[k])) for k in ("bot", "human")}
    return {
        "identities": {k: len(v) for k, v in ids.items()},
        "grants": {k: len(v) for k, v in grants.items()},
        "requests": requests,
        "requests_per_identity": {k: round(v, 2) for k, v in per_id.items()},
        "bot_rate_factor": round(per_id["bot"] / per_id["human"], 1) if per_id["human"] else 0,
        "bot_identity_share": round(len(ids["bot"]) / n_ids, 4),
        "bot_grant_share": round(len(grants["bot"]) / n_grants, 4),
    }


def check_fairness(records: list[Record]) -> list[str]:
    f = fairness(records)
    rows = [f"{'':<8}{'identities':>12}{'share':>8}{'grants':>8}{'share':>8}"
            f"{'requests':>10}{'req/identity':>14}"]
    for role in ("bot", "human"):
        ids, grants = f["identities"][role], f["grants"][role]
        rows.append(f"{role:<8}{ids:>12}{ids / max(1, sum(f['identities'].values())):>8.1%}"
                    f"{grants:>8}{grants / max(1, sum(f['grants'].values())):>8.1%}"
                    f"{f['requests'][role]:>10}{f['requests_per_identity'][role]:>14}")
    fair = f["bot_grant_share"] <= f["bot_identity_share"]
    rows.append(f"bots sent {f['bot_rate_factor']}x a human's requests per identity; "
                f"bots' grant share {f['bot_grant_share']:.1%} vs identity share "
                f"{f['bot_identity_share']:.1%}: {'FAIR' if fair else 'UNFAIR'}")
    r.OUT.mkdir(parents=True, exist_ok=True)
    (r.OUT / "fairness.txt").write_text("\n".join(rows) + "\n")
    (r.OUT / "fairness.json").write_text(json.dumps(f, indent=2) + "\n")
    print("\n".join(rows))
    if fair:
        return []
    return [f"bots got {f['bot_grant_share']:.1%} of the grants with "
            f"{f['bot_identity_share']:.1%} of the identities"]


r.checks.append(check_fairness)
