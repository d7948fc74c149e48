"""The hub pages' logic without a hub: money summaries, sign-up rules, the starter
workspace, and the proxy that streams (issue 11)."""

from __future__ import annotations

import asyncio
import json
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from tornado import web

from gpuportal.extensions import starter
from gpuportal.hub.pages import money
from gpuportal.hub.pages.signup import SignupAuthenticator
from gpuportal.provider.links import BILLING_PAGE, billing_url

NOW = datetime(2026, 1, 2, 12, 0, tzinfo=UTC)


def balance(micro: int, available: int | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "user": "ana",
        "balance": micro,
        "available": micro if available is None else available,
        "display": "",
        "currency": "credits",
        "rate_per_hour": 0,
        "runway_seconds": None,
        "warning": None,
        "allocations": [],
        **extra,
    }


def allocation(server: str = "", status: str = "running", **extra: Any) -> dict[str, Any]:
    return {
        "server": server,
        "gpu_count": 2,
        "price_per_gpu_hour": 1_500_000,
        "status": status,
        "started_at": (NOW - timedelta(minutes=10)).isoformat(),
        "ended_at": None,
        "stopping_at": None,
        "stop_reason": None,
        "charged": 0,
        **extra,
    }


def test_the_billing_page_has_one_address_for_the_spawn_form_to_link() -> None:
    assert BILLING_PAGE == "billing"
    assert billing_url() == "/hub/billing"
    assert billing_url("/@/space%20word/hub/") == "/@/space%20word/hub/billing"


def test_a_debt_is_shown_as_a_debt_with_a_warning() -> None:
    view = money.summary(balance(-4_050_000), [], NOW)
    assert (view["in_debt"], view["debt"], view["balance"]) == (
        True,
        "4.05 credits",
        "-4.05 credits",
    )
    assert view["warnings"] == ["You owe 4.05 credits. Add credit to start a GPU server again."]


def test_running_servers_show_gpus_price_and_spend_so_far() -> None:
    running = allocation(charged=100)
    view = money.summary(
        balance(9_000_000, rate_per_hour=3_000_000, runway_seconds=10_800.0, allocations=[running]),
        [running],
        NOW,
    )
    assert view["running"] == [
        {
            "server": "",
            "label": "default server",
            "gpus": 2,
            "price": "3.00 credits/h",
            # 2 GPUs x 1.5 credits/h x 10 min, by the meter's own formula
            "spent": "0.50 credits",
            "running_for": "10 min",
            "stopping_at": None,
        }
    ]
    assert (view["runway"], view["rate"], view["warnings"]) == ("3 h 0 min", "3.00 credits/h", [])


def test_the_portals_warning_and_a_stop_reason_reach_the_page() -> None:
    stopped = allocation(
        status="closed",
        ended_at=NOW.isoformat(),
        stop_reason="out_of_credit",
        charged=250_000,
    )
    view = money.summary(
        balance(1, warning="Out of credits: your servers stop at 12:00."), [stopped], NOW
    )
    assert view["warnings"] == ["Out of credits: your servers stop at 12:00."]
    assert view["recent"] == [
        {
            "server": "",
            "label": "default server",
            "gpus": 2,
            "cost": "0.25 credits",
            "ran_for": "10 min",
            "ended": "2026-01-02 12:00 UTC",
            "reason": "your credit ran out",
        }
    ]


def test_only_the_latest_session_of_a_server_and_none_of_a_running_one() -> None:
    older = allocation("gpu-a", status="closed", ended_at=NOW.isoformat(), charged=1)
    newer = allocation("gpu-a", status="closed", ended_at=NOW.isoformat(), charged=2)
    live = allocation("gpu-b")
    old_b = allocation("gpu-b", status="closed", ended_at=NOW.isoformat())
    view = money.summary(balance(5, allocations=[live]), [live, newer, older, old_b], NOW)
    assert [(r["server"], r["cost"]) for r in view["recent"]] == [("gpu-a", "0.00 credits")]


def test_no_account_yet_shows_nothing() -> None:
    assert money.summary(None, None, NOW) == {
        "known": False,
        "warnings": [],
        "running": [],
        "recent": [],
    }


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "less than a minute"), (59, "less than a minute"), (60, "1 min"), (3725, "1 h 2 min")],
)
def test_durations_read_as_words(seconds: float, text: str) -> None:
    assert money.duration(seconds) == text


@pytest.fixture
def authenticator(tmp_path: Path) -> SignupAuthenticator:
    return SignupAuthenticator(
        dbm_path=str(tmp_path / "passwords.dbm"),
        check_passwords_on_startup=False,
        min_password_length=8,
    )


@pytest.mark.parametrize(
    ("name", "password", "again", "problem"),
    [
        ("", "pw-12345678", "pw-12345678", "Choose a user name."),
        ("a b", "pw-12345678", "pw-12345678", "That user name cannot be used"),
        ("a,b", "pw-12345678", "pw-12345678", "That user name cannot be used"),
        ("ana", "short", "short", "Choose a password of at least 8 characters."),
        ("ana", "pw-12345678", "pw-87654321", "The two passwords differ"),
    ],
)
def test_sign_up_refusals_are_sentences(
    authenticator: SignupAuthenticator, name: str, password: str, again: str, problem: str
) -> None:
    said = authenticator.signup_problem(name, password, again)
    assert said is not None and said.startswith(problem)


def test_a_name_with_a_password_cannot_be_signed_up_again(
    authenticator: SignupAuthenticator,
) -> None:
    assert authenticator.signup_problem("ana", "pw-12345678", "pw-12345678") is None
    assert authenticator.store_new_password("ana", "pw-12345678")
    assert not authenticator.store_new_password("ana", "pw-other-password")


def make_templates(folder: Path, text: str = '{"cells": []}') -> Path:
    (folder / "team").mkdir(parents=True)
    (folder / "gpu-quickstart.ipynb").write_text(text)
    (folder / "team" / "train.ipynb").write_text(text)
    (folder / "README.md").write_text("not a notebook")
    return folder


def test_a_new_home_gets_the_starter_notebooks(tmp_path: Path) -> None:
    source = make_templates(tmp_path / "src")
    home = tmp_path / "home"
    home.mkdir()
    assert starter.install(home, source) == ["gpu-quickstart.ipynb", "team/train.ipynb"]
    assert (home / "gpu-quickstart.ipynb").read_text() == '{"cells": []}'
    assert not (home / "README.md").exists()
    assert starter.install(home, source) == [], "a second start copies nothing"


def test_the_users_changes_are_never_overwritten_nor_deletions_undone(tmp_path: Path) -> None:
    source = make_templates(tmp_path / "src")
    home = tmp_path / "home"
    home.mkdir()
    starter.install(home, source)
    (home / "gpu-quickstart.ipynb").write_text("my work")
    (home / "team" / "train.ipynb").unlink()
    (source / "gpu-quickstart.ipynb").write_text('{"cells": ["v2"]}')
    (source / "team" / "train.ipynb").write_text('{"cells": ["v2"]}')
    assert starter.install(home, source) == []
    assert (home / "gpu-quickstart.ipynb").read_text() == "my work"
    assert not (home / "team" / "train.ipynb").exists()


def test_an_untouched_copy_follows_a_newer_template(tmp_path: Path) -> None:
    source = make_templates(tmp_path / "src")
    home = tmp_path / "home"
    home.mkdir()
    starter.install(home, source)
    (source / "gpu-quickstart.ipynb").write_text('{"cells": ["v2"]}')
    assert starter.install(home, source) == ["gpu-quickstart.ipynb"]
    assert (home / "gpu-quickstart.ipynb").read_text() == '{"cells": ["v2"]}'
    manifest = json.loads((home / starter.MANIFEST).read_text())
    assert set(manifest) == {"gpu-quickstart.ipynb", "team/train.ipynb"}


def test_a_link_in_the_home_is_never_written_through(tmp_path: Path) -> None:
    source = make_templates(tmp_path / "src")
    home = tmp_path / "home"
    home.mkdir()
    outside = tmp_path / "outside.ipynb"
    outside.write_text("not yours")
    (home / "gpu-quickstart.ipynb").symlink_to(outside)
    assert starter.install(home, source) == ["team/train.ipynb"]
    assert outside.read_text() == "not yours"


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_the_proxy_relays_each_event_before_the_next_is_sent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The upstream sends its second event only once the client has the first; a
    proxy that buffers the response never delivers the first, and the test fails."""
    from configurable_http_proxy import configproxy

    from gpuportal.hub.stack.proxy import StreamingProxyHandler

    client_has_first = asyncio.Event()

    class Events(web.RequestHandler):
        async def get(self) -> None:
            self.set_header("Content-Type", "text/event-stream")
            self.write('data: {"progress": 10}\n\n')
            await self.flush()
            await asyncio.wait_for(client_has_first.wait(), 20)
            self.write('data: {"progress": 100, "ready": true}\n\n')

    upstream_port, proxy_port = _port(), _port()
    upstream = web.Application([(r"/hub/api/progress", Events)]).listen(upstream_port, "127.0.0.1")
    monkeypatch.setattr(configproxy, "ProxyHandler", StreamingProxyHandler)
    proxy = configproxy.PythonProxy({"auth_token": "x"})
    proxy.add_route("/", {"target": f"http://127.0.0.1:{upstream_port}"})
    server = proxy.proxy_app.listen(proxy_port, "127.0.0.1")
    received: list[str] = []
    try:
        async with (
            httpx.AsyncClient(timeout=30) as client,
            client.stream(
                "GET",
                f"http://127.0.0.1:{proxy_port}/hub/api/progress",
                headers={"Accept": "text/event-stream"},
            ) as reply,
        ):
            assert reply.status_code == 200
            assert reply.headers["content-type"].startswith("text/event-stream")
            async for chunk in reply.aiter_text():
                received.append(chunk)
                client_has_first.set()
    finally:
        server.stop()
        upstream.stop()
    assert "".join(received) == (
        'data: {"progress": 10}\n\ndata: {"progress": 100, "ready": true}\n\n'
    )
    assert len(received) >= 2, "the events came one at a time"


async def test_a_browser_that_leaves_ends_the_upstream_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A closed progress page must not keep the proxy reading the hub for an hour."""
    from configurable_http_proxy import configproxy
    from tornado.iostream import StreamClosedError

    from gpuportal.hub.stack.proxy import StreamingProxyHandler

    sent: list[int] = []
    upstream_done = asyncio.Event()

    class Endless(web.RequestHandler):
        async def get(self) -> None:
            self.set_header("Content-Type", "text/event-stream")
            try:
                for n in range(200):  # bounded: 200 events, 0.1 s apart
                    self.write(f"data: {n}\n\n")
                    await self.flush()
                    sent.append(n)
                    await asyncio.sleep(0.1)
            except StreamClosedError:
                pass
            finally:
                upstream_done.set()

    upstream_port, proxy_port = _port(), _port()
    upstream = web.Application([(r"/events", Endless)]).listen(upstream_port, "127.0.0.1")
    monkeypatch.setattr(configproxy, "ProxyHandler", StreamingProxyHandler)
    proxy = configproxy.PythonProxy({"auth_token": "x"})
    proxy.add_route("/", {"target": f"http://127.0.0.1:{upstream_port}"})
    server = proxy.proxy_app.listen(proxy_port, "127.0.0.1")
    try:
        async with (
            httpx.AsyncClient(timeout=30) as client,
            client.stream(
                "GET",
                f"http://127.0.0.1:{proxy_port}/events",
                headers={"Accept": "text/event-stream"},
            ) as reply,
        ):
            async for _chunk in reply.aiter_text():
                break  # the user closes the page after the first event
        await asyncio.wait_for(upstream_done.wait(), 60)
    finally:
        server.stop()
        upstream.stop()
    assert len(sent) < 200, "the proxy stopped reading once the browser had gone"


def test_every_account_but_an_admins_is_a_customer_in_the_hub(
    authenticator: SignupAuthenticator,
) -> None:
    """The hub's ``customers`` group holds whom the portal counts as customers:
    ``add_user`` runs at sign-up, when an admin adds a user, and at each start."""
    from jupyterhub import orm

    session = orm.new_session_factory("sqlite://")()
    authenticator.admin_users = {"root"}
    users = {name: orm.User(name=name) for name in ("ana", "root", "old")}
    users["old"].admin = False
    session.add_all(users.values())
    session.commit()
    for user in users.values():
        authenticator.add_user(user)
        authenticator.add_user(user)  # idempotent, as a restart needs
    group = orm.Group.find(session, "customers")
    assert sorted(u.name for u in group.users) == ["ana", "old"]


# --- why a server stopped itself (the spawner's reason) ------------------------------


class _Spawner:
    def __init__(self, reason: Any = "", active: bool = False) -> None:
        self.stopped_reason, self.active = reason, active


class _User:
    def __init__(self, spawners: dict[str, Any]) -> None:
        self.spawners = spawners


def test_self_stops_lists_servers_that_stopped_themselves_and_are_not_running() -> None:
    from gpuportal.hub.pages.stops import self_stops

    idle = "it was idle for 30 min (no kernel or GPU was busy)"
    user = _User(
        {
            "": _Spawner(idle),
            "gpu": _Spawner("it stopped on its own", active=True),  # running again
            "b": _Spawner(""),
            "c": _Spawner(None),
            "d": _Spawner("x" * 1000),
        }
    )
    assert self_stops(user) == [
        {"server": "", "label": "default server", "reason": idle},
        {"server": "d", "label": "d", "reason": "x" * 200},
    ]
    assert self_stops(None) == []  # the login page has no user
    assert self_stops(_User({"": object()})) == []  # another spawner class
