"""The one-time tickets that carry a user's token to a dashboard's kernel, and the
proxy's websocket subprotocol answer; pure logic."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from gpuportal.dashboards import tickets
from gpuportal.dashboards.tickets import Tickets
from gpuportal.hub.stack.proxy import select_subprotocol


def test_a_ticket_is_redeemed_once_for_its_token_and_user() -> None:
    held = Tickets()
    ticket = held.issue("tok-a", "alice")
    assert held.redeem(ticket) == ("tok-a", "alice")
    assert held.redeem(ticket) is None


@pytest.mark.parametrize("guess", ["", "x", "tok-a", "alice"])
def test_a_guessed_ticket_redeems_nothing(guess: str) -> None:
    held = Tickets()
    held.issue("tok-a", "alice")
    assert held.redeem(guess) is None


def test_an_expired_ticket_redeems_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(tickets.time, "monotonic", lambda: now[0])
    held = Tickets()
    ticket = held.issue("tok-a", "alice")
    now[0] += tickets.TTL_SECONDS + 1
    assert held.redeem(ticket) is None
    assert held.held == {}


def test_tickets_held_at_once_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tickets, "MAX_TICKETS", 3)
    held = Tickets()
    first = held.issue("t0", "u0")
    for i in range(1, 4):
        held.issue(f"t{i}", f"u{i}")
    assert len(held.held) == 3 and held.redeem(first) is None


def test_each_ticket_is_different() -> None:
    held = Tickets()
    assert len({held.issue("tok", "alice") for _ in range(50)}) == 50


@pytest.mark.parametrize(
    ("upstream", "offered", "answer"),
    [
        (
            "v1.kernel.websocket.jupyter.org",
            ["v1.kernel.websocket.jupyter.org"],
            "v1.kernel.websocket.jupyter.org",
        ),
        (None, ["v1.kernel.websocket.jupyter.org"], None),
        ("other", ["v1.kernel.websocket.jupyter.org"], None),
    ],
    ids=["the-servers-choice", "the-server-chose-none", "not-offered-by-the-browser"],
)
def test_the_proxy_answers_the_subprotocol_the_server_chose(
    upstream: str | None, offered: list[str], answer: str | None
) -> None:
    handler = SimpleNamespace(ws_client=SimpleNamespace(selected_subprotocol=upstream))
    assert select_subprotocol(handler, offered) == answer
    assert select_subprotocol(SimpleNamespace(ws_client=None), offered) is None
