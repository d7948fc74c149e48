"""A dashboard's failures are sentences: the kernel client's answers to the portal's
refusals, and a part of a page that fails to draw; pure logic, no server."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from gpuportal.dashboards import client, display
from gpuportal.dashboards.client import PortalError


@pytest.mark.parametrize(
    ("status", "body", "sentence"),
    [
        (401, {}, "Your hub login has expired; log in again and reload the page."),
        (
            403,
            {"error": {"message": "This needs the admin role; you are a customer."}},
            "This needs the admin role; you are a customer.",
        ),
        (403, {}, "You may not see this dashboard."),
        (
            500,
            {"error": {"message": "Traceback (most recent call last): ..."}},
            "The portal could not answer just now; reload the page in a moment.",
        ),
        (422, {"error": {"message": "days: must be at most 366"}}, "days: must be at most 366"),
    ],
)
def test_a_portal_refusal_is_a_sentence(status: int, body: dict[str, Any], sentence: str) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        assert request.headers["Authorization"] == "token tok"
        return httpx.Response(status, json=body)

    portal = client.Portal(
        "http://127.0.0.1:9/services/portal/",
        "alice",
        "tok",
        http=httpx.Client(transport=httpx.MockTransport(answer)),
    )
    with pytest.raises(PortalError) as raised:
        portal.get("api/v1/dashboards/analytics")
    assert str(raised.value) == sentence


def test_a_page_opened_without_the_hub_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(client.TICKET_ENV, raising=False)
    monkeypatch.delenv("VOILA_PREHEAT", raising=False)
    with pytest.raises(PortalError, match="opens only through the hub"):
        client.connect()


def test_the_token_is_not_in_the_clients_repr() -> None:
    assert "secret-token" not in repr(client.Portal("http://x/", "alice", "secret-token"))


@pytest.mark.parametrize(
    ("build", "shown"),
    [
        (lambda: 1 / 0, "This part of the dashboard could not be drawn; the error is logged."),
        (
            lambda: (_ for _ in ()).throw(PortalError("The portal is not answering.")),
            "The portal is not answering.",
        ),
    ],
    ids=["a-bug", "the-portal-refused"],
)
def test_a_part_that_fails_shows_a_sentence_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, build: Any, shown: str
) -> None:
    seen: list[Any] = []
    monkeypatch.setattr(display, "display", seen.append)
    display.show(build)
    (widget,) = seen
    assert shown in widget.value and "Traceback" not in widget.value
    assert 'class="gp-problem"' in widget.value


def test_text_in_a_widget_is_escaped() -> None:
    assert "<script>" not in display.problem("<script>alert(1)</script>").value
    assert "&lt;b&gt;" in display.kpis([("<b>", "1")]).children[0].value
