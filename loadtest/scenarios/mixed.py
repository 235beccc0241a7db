"""mixed: a release (as in `release`, with a smaller stock) while an operator steers it
through the admin API: pauses a quarter into the hold, resumes, and restocks twice; the
verifier holds the grants to stock plus the restocks the operator made."""

from __future__ import annotations

import time

from locust import constant, task

from gateway.durable.verify import RestockDone
from loadtest import plan
from loadtest import rehearsal as r

STEPS = ((0.25, "pause"), (0.4, "resume"), (0.6, "restock"), (0.8, "restock"))


class Person(r.Claimant):
    @task
    def press(self) -> None:
        who = r.Person.new("mixed")
        for _ in range(8):
            status, body, headers = self.claim(who)
            if status not in (429, 503) and body.get("code") not in ("not_started", "paused"):
                return
            self.pause(r.retry_after(headers))


class Operator(r.Claimant):
    fixed_count = 1
    wait_time = constant(3600)

    @task
    def steer(self) -> None:
        admin = {"Authorization": f"Bearer {r.settings.admin_token}"}
        base = f"/v1/campaigns/{r.knobs.campaign}"
        for at, verb in STEPS:
            self.pause(max(0.0, r.knobs.t0 + at * r.knobs.hold_s - time.time()))
            body = {"quantity": plan.MIXED_RESTOCK} if verb == "restock" else None
            with self.client.post(f"{base}/{verb}", json=body, headers=admin,
                                  name=f"admin {verb}", catch_response=True) as resp:
                if resp.status_code != 200:
                    resp.failure(f"{verb}: {resp.status_code} {resp.text}")
                    continue
                resp.success()
            if verb == "restock":
                r.recorder.add(RestockDone(plan.MIXED_RESTOCK))


class Mixed(r.PhasedShape):
    pass
