"""waiting_room: everybody arrives before T0 and enters the campaign's waiting room (`202`
with a ticket); each polls with its ticket when Retry-After says, claims when admitted,
and stops at `410`; later arrivals queue behind them."""

from __future__ import annotations

from locust import task

from loadtest import rehearsal as r

ROOM_RETRY_CAP_S = 30.0  # the room's own Retry-After never exceeds this


class Queuer(r.Claimant):
    @task
    def queue(self) -> None:
        who = r.Person.new("room")
        ticket: str | None = None
        for _ in range(200):
            status, body, headers = self.claim(who, ticket=ticket)
            if status == 202:
                ticket = body.get("ticket") or headers.get("Waiting-Room-Ticket")
                self.pause(r.retry_after(headers, ROOM_RETRY_CAP_S))
            elif status in (429, 503) or body.get("code") == "not_started":
                self.pause(r.retry_after(headers))
            elif body.get("code") == "ticket_expired":
                ticket = None  # our turn passed: rejoin
            else:
                return  # 201, limit_reached, sold_out


class WaitingRoom(r.PhasedShape):
    idle = -1
