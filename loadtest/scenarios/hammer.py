"""hammer: people who retry as fast as they can, ignoring Retry-After: every other one
re-sends one Idempotency-Key (a retrying client), the others just click again. The limit
is two per user; the per-user rate answers most of the noise with `429`."""

from __future__ import annotations

import itertools

from locust import constant, task

from loadtest import rehearsal as r

TRIES = 25


class Hammerer(r.Claimant):
    wait_time = constant(0)
    keyed = itertools.cycle((True, False))

    @task
    def hammer(self) -> None:
        who = r.Person.new("hammer")
        key = f"k-{who.user}" if next(self.keyed) else None
        for _ in range(TRIES):
            status, _, _ = self.claim(who, idem=key)
            if status == 410:
                return


class Hammer(r.PhasedShape):
    pass
