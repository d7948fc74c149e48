"""The dashboards' kernel side: who is looking, and the portal API as that person.

A dashboard's first cell calls :func:`connect`. In a preheated kernel that waits until a
user opens the page (Voila then hands the kernel the request's details); the request
carries a one-time ticket (:mod:`.tickets`) which :func:`connect` redeems with the
dashboards service, over 127.0.0.1, for the user's own hub token. Every call then goes
to the portal with that token, so the portal decides what this person may see.

Failures are :class:`PortalError` with a sentence for people; nothing here prints a
token, and the token never goes back into ``os.environ``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import httpx

from .tickets import TICKET_ENV

#: Set by the service for its kernels: the service itself, on 127.0.0.1.
SERVICE_URL_ENV = "GPUPORTAL_DASHBOARDS_URL"
#: Set by the hub for the service: the portal API (``.../services/portal/``).
PORTAL_URL_ENV = "GPUPORTAL_PORTAL_URL"
TIMEOUT = httpx.Timeout(30.0, connect=5.0)


class PortalError(Exception):
    """A failure to show, as a sentence."""


@dataclass
class Portal:
    """The portal API as one hub user."""

    base_url: str
    user: str
    token: str = field(repr=False)
    #: One connection pool for the page's life (a dashboard calls the portal again
    #: when its user changes the period).
    http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=TIMEOUT), repr=False)

    def get(self, path: str, **params: Any) -> Any:
        """GET ``path`` (relative to the portal's prefix) as the user; JSON back."""
        url = self.base_url.rstrip("/") + "/" + path.lstrip("/")
        try:
            reply = self.http.get(
                url,
                params=params,
                headers={"Authorization": f"token {self.token}", "Accept": "application/json"},
            )
        except httpx.HTTPError:
            raise PortalError("The portal is not answering; reload the page in a moment.") from None
        if reply.status_code == 200:
            return reply.json()
        raise PortalError(_sentence(reply))


def _sentence(reply: httpx.Response) -> str:
    if reply.status_code == 401:
        return "Your hub login has expired; log in again and reload the page."
    try:
        message = str(reply.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = ""
    if reply.status_code == 403:
        return message or "You may not see this dashboard."
    if reply.status_code >= 500:
        return "The portal could not answer just now; reload the page in a moment."
    return message or f"The portal refused the request ({reply.status_code})."


def connect() -> Portal:
    """The portal as the user who opened this page (waits for them in a preheated kernel)."""
    if os.environ.get("VOILA_PREHEAT") == "True":
        from voila.utils import wait_for_request

        wait_for_request()
    ticket = os.environ.pop(TICKET_ENV, "")
    service = os.environ.get(SERVICE_URL_ENV, "")
    portal_url = os.environ.get(PORTAL_URL_ENV, "")
    if not ticket or not service or not portal_url:
        raise PortalError("This dashboard opens only through the hub; open it from the hub's page.")
    try:
        reply = httpx.get(
            service.rstrip("/") + "/gpuportal/ticket",
            headers={"Authorization": f"ticket {ticket}"},
            timeout=TIMEOUT,
        )
    except httpx.HTTPError:
        raise PortalError("The dashboards service is not answering; reload the page.") from None
    if reply.status_code != 200:
        raise PortalError("This page has expired; reload it to see your dashboard.")
    body = reply.json()
    return Portal(base_url=portal_url, user=str(body["user"]), token=str(body["token"]))
