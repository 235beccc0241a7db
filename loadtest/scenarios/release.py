"""release: idle before T0, a spike of people at T0, hold, drain. Each person claims once
with a fresh identity; a `429`/`503`/`not_started` is retried after its Retry-After."""

from __future__ import annotations

from locust import task

from loadtest import rehearsal as r


class Person(r.Claimant):
    @task
    def press(self) -> None:
        who = r.Person.new("release")
        for _ in range(5):
            status, body, headers = self.claim(who)
            if status not in (429, 503) and body.get("code") != "not_started":
                return
            self.pause(r.retry_after(headers))


class Release(r.PhasedShape):
    pass
