"""What every Locust scenario shares: people with real signed identity tokens and their own
address (X-Forwarded-For), a claim call that records every grant it sees (JSON lines per
process), the release-shaped load, and the verdict when Locust quits (`flashclaim verify`,
plus the scenario's own checks), which sets Locust's exit code."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent
from locust import FastHttpUser, LoadTestShape, events
from locust.env import Environment
from locust.runners import WorkerRunner

from gateway.durable.verify import GrantSeen, Record, RestockDone, Seen, Tally, record_encoder
from gateway.identity import mint_token
from gateway.settings import load_settings
from loadtest.plan import Knobs

knobs = Knobs.from_env()
settings = load_settings()
OUT = Path(knobs.out)
GRANTS = OUT / "grants"
CLAIMS = f"/v1/campaigns/{knobs.campaign}/claims"
RETRY_CAP_S = 2.0  # a rehearsal honours Retry-After, but never sleeps longer than this

# answers a claim may legitimately get in a release; anything else is a failure
EXPECTED = {201, 202, 409, 410, 429, 503}

_serial = itertools.count(1)
tally: Counter[tuple[str, int]] = Counter()
checks: list[Callable[[list[Record]], list[str]]] = []  # a scenario's own verdicts


class Recorder:
    """This process's JSON-lines log of identities used and grants seen."""

    def __init__(self) -> None:
        self._lines: list[bytes] = []
        self.path = GRANTS / f"{knobs.scenario}-{os.getpid()}.jsonl"

    def add(self, record: Record) -> None:
        self._lines.append(record_encoder.encode(record) + b"\n")
        if len(self._lines) >= 512:
            self.flush()

    def flush(self) -> None:
        if self._lines:
            GRANTS.mkdir(parents=True, exist_ok=True)
            with self.path.open("ab") as f:
                f.write(b"".join(self._lines))
            self._lines.clear()


recorder = Recorder()


def address(n: int, net: str = "10") -> str:
    return f"{net}.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"


@dataclass
class Person:
    role: str
    user: str
    dev: str
    ip: str
    token: str

    @classmethod
    def new(cls, role: str, *, dev: str | None = None, ip: str | None = None) -> Person:
        """A fresh identity; by default its own device and address."""
        n = next(_serial)
        user = f"{role[0]}{os.getpid()}-{n}"
        dev = dev if dev is not None else f"dev-{user}"
        ip = ip if ip is not None else address(n + (os.getpid() % 200) * 65536)
        assert settings.identity_secret, "FLASHCLAIM_IDENTITY_SECRET is not set"
        token = mint_token(settings.identity_secret, user, ttl_s=6 * 3600, dev=dev or None)
        recorder.add(Seen(role=role, user=user, dev=dev, ip=ip))
        return cls(role, user, dev, ip, token)


def retry_after(headers: Any, cap_s: float = RETRY_CAP_S) -> float:
    try:
        return min(cap_s, max(0.0, float(headers.get("Retry-After") or 0.5)))
    except ValueError:
        return 0.5


class Claimant(FastHttpUser):
    abstract = True

    def pause(self, seconds: float) -> None:
        gevent.sleep(seconds)

    def claim(self, who: Person, *, name: str = "claim", ticket: str | None = None,
              idem: str | None = None) -> tuple[int, dict[str, Any], Any]:
        """One claim; records a grant; returns (status, body, headers)."""
        headers = {"Authorization": f"Bearer {who.token}", "X-Forwarded-For": who.ip}
        if ticket:
            headers["Waiting-Room-Ticket"] = ticket
        if idem:
            headers["Idempotency-Key"] = idem
        with self.client.post(CLAIMS, headers=headers, name=name, catch_response=True) as r:
            status = r.status_code
            tally[(who.role, status)] += 1
            try:
                body = r.json() if r.content else {}
            except ValueError:
                body = {}
            if status not in EXPECTED:
                r.failure(f"unexpected {status}: {body.get('code', '')} {body.get('detail', '')}")
            elif status == 201 and body.get("user_id") != who.user:
                r.failure(f"a grant for {body.get('user_id')!r} answered {who.user!r}")
            else:
                r.success()
            if status == 201:
                recorder.add(GrantSeen(role=who.role, user=who.user, dev=who.dev, ip=who.ip,
                                       claim_id=str(body.get("claim_id")),
                                       seq=int(body.get("seq", 0)), at=time.time()))
            return status, body, r.headers


class PhasedShape(LoadTestShape):
    """A release: `idle` users before T0 (the campaign's start), the peak from T0 for the
    hold, then a linear drain; the test ends after it."""

    idle = 1  # users before T0; -1: everybody (they queue before the start)

    def tick(self) -> tuple[int, float] | None:
        t = time.time() - knobs.t0
        peak = knobs.peak
        if t < 0:
            return (peak if self.idle < 0 else self.idle), max(50, peak)
        if t < knobs.hold_s:
            return peak, max(50, peak)  # the spike: everybody within a second or two
        t -= knobs.hold_s
        if t < knobs.drain_s:
            return max(1, round(peak * (1 - t / knobs.drain_s))), max(50, peak)
        return None


# ---- the verdict ---------------------------------------------------------------------------

def latency(env: Environment, name: str) -> dict[str, float]:
    e = env.stats.get(name, "POST")
    return {"requests": e.num_requests, "rps": round(e.total_rps, 1),
            "p50_ms": e.get_response_time_percentile(0.5),
            "p99_ms": e.get_response_time_percentile(0.99)}


def summarize(env: Environment, records: list[Record]) -> dict[str, Any]:
    grants = {r.claim_id: r for r in records if isinstance(r, GrantSeen)}
    times = sorted(g.at for g in grants.values())
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    statuses: dict[str, dict[str, int]] = {}
    for r in records:
        if isinstance(r, Tally):
            mine = statuses.setdefault(r.role, {})
            for k, n in r.statuses.items():
                mine[k] = mine.get(k, 0) + n
    in_hold = sum(1 for t in times if knobs.t0 <= t < knobs.t0 + knobs.hold_s)
    return {
        "scenario": knobs.scenario, "campaign": knobs.campaign, "peak_users": knobs.peak,
        "t0": knobs.t0, "hold_s": knobs.hold_s,
        "grants_seen": len(grants), "grant_span_s": round(span, 2),
        "claims_per_s": round(len(grants) / span, 1) if span else 0.0,
        "hold_claims_per_s": round(in_hold / knobs.hold_s, 1),
        "restocks": sum(r.quantity for r in records if isinstance(r, RestockDone)),
        "claim": latency(env, "claim") if knobs.scenario != "bots" else {
            role: latency(env, f"claim [{role}]") for role in ("bot", "human")},
        "statuses": statuses,
    }


@events.test_stop.add_listener
def _on_stop(environment: Environment, **_: Any) -> None:
    roles: dict[str, dict[str, int]] = {}
    for (role, status), n in tally.items():
        roles.setdefault(role, {})[str(status)] = n
    tally.clear()
    for role, statuses in roles.items():
        recorder.add(Tally(role, statuses))
    recorder.flush()


@events.quitting.add_listener
def _verdict(environment: Environment, **_: Any) -> None:
    """Runs `flashclaim verify` on the campaign and this run's grant logs, then the
    scenario's own checks; any failure makes Locust exit 1."""
    recorder.flush()
    if isinstance(environment.runner, WorkerRunner):
        return
    from gateway.durable.verify import read_records

    cmd = [sys.executable, "-m", "gateway.cli", "verify", "--campaign", knobs.campaign]
    if GRANTS.is_dir():
        cmd += ["--grants", str(GRANTS)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    text = done.stdout + done.stderr
    records = read_records([GRANTS]) if GRANTS.is_dir() else []
    failures = [m for check in checks for m in check(records)]
    if failures:
        text += "scenario checks failed:\n" + "".join(f"  - {m}\n" for m in failures)
    summary = summarize(environment, records)
    summary["verify_exit"] = done.returncode
    summary["passed"] = done.returncode == 0 and not failures
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "verdict.txt").write_text(text)
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    sys.stderr.write(f"\n==== verdict ({knobs.scenario}) ====\n{text}"
                     f"{json.dumps(summary, indent=2)}\n")
    errors = bool(environment.runner and environment.runner.errors)
    environment.process_exit_code = 0 if summary["passed"] and not errors else 1
