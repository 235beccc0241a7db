"""The error tree: every failure a client can see, with its HTTP status, problem `code`
and metric label. `gateway.http.problems` is the one place that turns these into responses.

    Problem (500 internal)
     ├── BadRequest (400 malformed_json)
     │    └── BadHeader (400 bad_header)
     ├── Unauthorized (401 unauthorized)
     ├── Forbidden (403 forbidden)
     │    ├── NotEligible (403 not_eligible)
     │    ├── Blocked (403 blocked)       user, device or address on a blocklist
     │    ├── ProofRequired (403 proof_required)  the campaign's anti-bot proof is missing
     │    ├── BadTicket (403 bad_ticket)
     │    └── InvalidCode (403 invalid_code)   redemption code unknown or used
     ├── NotFound (404 not_found)
     ├── RequestTimeout (408 timeout)    a body that did not arrive in time
     ├── Conflict (409 conflict)
     │    ├── LimitReached (409 limit_reached)
     │    ├── NotStarted (409 not_started)
     │    ├── Paused (409 paused)
     │    ├── AlreadyEnded (409 ended)    operator action on an ended campaign
     │    └── OverBudget (409 budget_cap) a restock past what the budget cap pays for
     ├── Gone (410)
     │    ├── SoldOut (410 sold_out)
     │    ├── Ended (410 ended)
     │    └── TicketExpired (410 ticket_expired)
     ├── PayloadTooLarge (413 too_large)
     ├── Unprocessable (422 invalid)
     ├── TooManyRequests (429 rate_limited)
     │    ├── AdmissionLimited (429 admission)
     │    └── CodeAttempts (429 code_attempts)   too many wrong redemption codes
     └── Unavailable (503 unavailable)
          ├── Overloaded (503 overloaded)
          └── TooManyConnections (503 too_many_connections)  per-address connection cap
"""

from __future__ import annotations

from typing import Any, ClassVar


class Problem(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal"
    title: ClassVar[str] = "Internal error"
    close: ClassVar[bool] = False  # answer, then close the connection

    def __init__(
        self,
        detail: str | None = None,
        *,
        retry_after: float | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.retry_after = retry_after
        self.headers = headers or {}
        self.extra = extra


class BadRequest(Problem):
    status, code, title = 400, "malformed_json", "Malformed request body"


class BadHeader(BadRequest):
    code, title = "bad_header", "Malformed request header"


class Unauthorized(Problem):
    status, code, title = 401, "unauthorized", "Missing or invalid credentials"


class Forbidden(Problem):
    status, code, title = 403, "forbidden", "Forbidden"


class NotEligible(Forbidden):
    code, title = "not_eligible", "Not eligible for this campaign"


class Blocked(Forbidden):
    code, title = "blocked", "Blocked"


class ProofRequired(Forbidden):
    code, title = "proof_required", "Anti-bot proof required"


class BadTicket(Forbidden):
    code, title = "bad_ticket", "Waiting-room ticket refused"


class InvalidCode(Forbidden):
    code, title = "invalid_code", "Redemption code not valid"


class NotFound(Problem):
    status, code, title = 404, "not_found", "Not found"


class RequestTimeout(Problem):
    status, code, title = 408, "timeout", "Request body too slow"
    close = True  # the rest of the body is not worth waiting for


class Conflict(Problem):
    status, code, title = 409, "conflict", "Conflict"


class LimitReached(Conflict):
    code, title = "limit_reached", "Claim limit reached"


class NotStarted(Conflict):
    code, title = "not_started", "Campaign has not started yet"


class Paused(Conflict):
    code, title = "paused", "Campaign is paused"


class AlreadyEnded(Conflict):
    code, title = "ended", "Campaign has ended"


class OverBudget(Conflict):
    code, title = "budget_cap", "Over the campaign's budget cap"


class Gone(Problem):
    status, code, title = 410, "gone", "Gone"


class SoldOut(Gone):
    code, title = "sold_out", "Sold out"


class Ended(Gone):
    code, title = "ended", "Campaign has ended"


class TicketExpired(Gone):
    code, title = "ticket_expired", "Waiting-room turn passed"


class PayloadTooLarge(Problem):
    status, code, title = 413, "too_large", "Request body too large"


class Unprocessable(Problem):
    status, code, title = 422, "invalid", "Request body has the wrong shape"


class TooManyRequests(Problem):
    status, code, title = 429, "rate_limited", "Too many requests"


class AdmissionLimited(TooManyRequests):
    code, title = "admission", "Over the campaign's admission rate"


class CodeAttempts(TooManyRequests):
    code, title = "code_attempts", "Too many wrong redemption codes"


class Unavailable(Problem):
    status, code, title = 503, "unavailable", "Service temporarily unavailable"


class Overloaded(Unavailable):
    code, title = "overloaded", "Overloaded; retry shortly"


class TooManyConnections(Unavailable):
    code, title = "too_many_connections", "Too many connections from this address"
