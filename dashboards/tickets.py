"""One-time tickets that carry a user's hub token from the render handler to its kernel.

Voila hands a preheated kernel its request's details over a websocket that is not
authenticated, and keeps them in memory; so the token itself never travels that way.
The render handler issues a random ticket for the user's token, the request carries
the ticket to the kernel, and the kernel redeems it once, from this machine, within
:data:`TTL_SECONDS`. A redeemed, expired or guessed ticket is a 404.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field

from tornado import web

#: The request header (set by the service, never taken from a browser) that Voila
#: passes to the kernel as ``HTTP_X_GPUPORTAL_DASHBOARD_TICKET``.
TICKET_HEADER = "X-Gpuportal-Dashboard-Ticket"
TICKET_ENV = "HTTP_" + TICKET_HEADER.upper().replace("-", "_")
#: A page's kernel redeems its ticket as soon as the request reaches it.
TTL_SECONDS = 120.0
#: Bound on tickets held at once (each page view adds one; redeemed ones go).
MAX_TICKETS = 10_000


@dataclass
class Tickets:
    """Tickets in this process's memory: ticket -> (token, user, expiry)."""

    held: dict[str, tuple[str, str, float]] = field(default_factory=dict)

    def issue(self, token: str, user: str) -> str:
        self._expire()
        if len(self.held) >= MAX_TICKETS:
            self.held.pop(next(iter(self.held)))
        ticket = secrets.token_urlsafe(32)
        self.held[ticket] = (token, user, time.monotonic() + TTL_SECONDS)
        return ticket

    def redeem(self, ticket: str) -> tuple[str, str] | None:
        """The (token, user) for a live ticket, once; None otherwise."""
        self._expire()
        found = self.held.pop(ticket, None)
        return None if found is None else (found[0], found[1])

    def _expire(self) -> None:
        now = time.monotonic()
        for ticket in [t for t, (_, _, expiry) in self.held.items() if expiry < now]:
            del self.held[ticket]


class TicketHandler(web.RequestHandler):
    """``GET .../gpuportal/ticket`` with ``Authorization: ticket <t>``, from a kernel here.

    Kernels call the service directly on 127.0.0.1; a request that came through the
    hub's proxy (``X-Forwarded-For``) is not a kernel's and gets a 404 like a bad ticket.
    """

    def get(self) -> None:
        scheme, _, ticket = self.request.headers.get("Authorization", "").partition(" ")
        found = None
        if scheme.lower() == "ticket" and not self.request.headers.get("X-Forwarded-For"):
            tickets: Tickets = self.settings["gpuportal_tickets"]
            found = tickets.redeem(ticket.strip())
        self.set_header("Cache-Control", "no-store")
        self.set_header("Content-Type", "application/json")
        if found is None:
            self.set_status(404)
            self.finish(json.dumps({"error": "no such ticket"}))
            return
        token, user = found
        self.finish(json.dumps({"token": token, "user": user}))
