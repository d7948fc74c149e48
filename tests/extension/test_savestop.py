"""Save before stop: the server asks the front end to save, and stops once it answered or
after a short bound, never later (extensions/savestop.py).

Pure rules first, then the extension inside a real jupyter-server (pytest-jupyter's
``jp_serverapp``), time moved through the extension's clock; the stop hook records the
call instead of stopping the test's own server (in production it is ServerApp.stop).
The browser's side of the protocol is in test_lab_browser.py.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from tornado.httpclient import HTTPClientError

from gpuportal.extensions.portal import PortalReading
from gpuportal.extensions.savestop import SaveBeforeStop

from .test_handlers import extension, fetch

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def test_one_request_at_a_time_and_the_earlier_stop_wins() -> None:
    saves = SaveBeforeStop(wait_seconds=30)
    first = saves.request("idle", T0, T0 + timedelta(seconds=60))
    again = saves.request("out_of_credit", T0, T0 + timedelta(seconds=10))
    assert again is first
    assert (first.reason, first.stop_at) == ("out_of_credit", T0 + timedelta(seconds=10))
    later = saves.request("idle", T0, T0 + timedelta(hours=1))
    assert (later.reason, later.stop_at) == ("out_of_credit", T0 + timedelta(seconds=10))


@pytest.mark.parametrize(
    ("stop_in", "acked", "stops_at"),
    [
        (0, False, 30),  # nobody answers: the bound
        (0, True, 0),  # answered: at once
        (90, False, 90),  # a later scheduled stop: then, not before
        (90, True, 90),
    ],
)
def test_the_stop_time_is_the_bound_or_the_answer(stop_in: int, acked: bool, stops_at: int) -> None:
    saves = SaveBeforeStop(wait_seconds=30)
    request = saves.request("idle", T0, T0 + timedelta(seconds=stop_in))
    if acked:
        assert saves.acknowledge(request.id, T0, ["a.ipynb"], []) is True
    assert saves.stop_time() == T0 + timedelta(seconds=stops_at)


def test_an_old_or_repeated_acknowledgement_changes_nothing() -> None:
    saves = SaveBeforeStop(wait_seconds=30)
    request = saves.request("idle", T0)
    assert saves.acknowledge("not-the-id", T0, [], []) is False
    assert saves.acknowledge(request.id, T0, ["a.ipynb"], ["b.txt"]) is True
    assert saves.acknowledge(request.id, T0, [], []) is False
    assert saves.report() == {
        "id": request.id,
        "reason": "idle",
        "requested_at": T0.isoformat(),
        "stop_at": T0.isoformat(),
        "deadline": (T0 + timedelta(seconds=30)).isoformat(),
        "acknowledged": True,
        "saved": ["a.ipynb"],
        "failed": ["b.txt"],
    }
    saves.cancel()
    assert saves.report() is None
    assert saves.acknowledge(request.id, T0, [], []) is False


@pytest.fixture
def gpuportal_config(gpuportal_config: dict[str, Any]) -> dict[str, Any]:
    return {**gpuportal_config, "idle_timeout_seconds": 1800, "save_wait_seconds": 30}


def usage(loop: asyncio.AbstractEventLoop, jp_fetch: Any) -> dict[str, Any]:
    return json.loads(fetch(loop, jp_fetch, "api", "gpuportal", "usage").body)


def ack(loop: asyncio.AbstractEventLoop, jp_fetch: Any, body: Any) -> Any:
    return fetch(
        loop, jp_fetch, "api", "gpuportal", "save-ack", method="POST", body=json.dumps(body)
    )


def settle(loop: asyncio.AbstractEventLoop) -> None:
    """Let the stop task take its next steps (each waits at most one second)."""
    loop.run_until_complete(asyncio.sleep(1.2))


def test_an_idle_cull_asks_the_front_end_to_save_and_stops_once_it_answered(
    jp_fetch: Any, jp_asyncio_loop: Any, jp_serverapp: Any
) -> None:
    ext = extension(jp_serverapp)
    stops: list[str] = []
    ext.stop_server = stops.append
    start = ext.clock()
    ext.clock = lambda: start + timedelta(minutes=31)
    assert jp_asyncio_loop.run_until_complete(ext.check_idle()) is True
    save = usage(jp_asyncio_loop, jp_fetch)["save"]
    assert (save["reason"], save["acknowledged"]) == ("idle", False)
    settle(jp_asyncio_loop)
    assert stops == []  # waiting for the front end

    reply = ack(jp_asyncio_loop, jp_fetch, {"id": save["id"], "saved": ["a.ipynb"], "failed": []})
    assert json.loads(reply.body) == {"acknowledged": True}
    jp_asyncio_loop.run_until_complete(asyncio.wait_for(ext._stop_task, 10))
    assert stops == ["idle"]
    assert usage(jp_asyncio_loop, jp_fetch)["save"]["saved"] == ["a.ipynb"]


def test_without_an_answer_the_stop_waits_the_bound_and_no_longer(
    jp_fetch: Any, jp_asyncio_loop: Any, jp_serverapp: Any
) -> None:
    ext = extension(jp_serverapp)
    stops: list[str] = []
    ext.stop_server = stops.append
    start = ext.clock()
    ext.clock = lambda: start + timedelta(minutes=31)
    assert jp_asyncio_loop.run_until_complete(ext.check_idle()) is True
    settle(jp_asyncio_loop)
    ext.clock = lambda: start + timedelta(minutes=31, seconds=29)
    settle(jp_asyncio_loop)
    assert stops == []
    ext.clock = lambda: start + timedelta(minutes=31, seconds=30)
    jp_asyncio_loop.run_until_complete(asyncio.wait_for(ext._stop_task, 10))
    assert stops == ["idle"]


def test_a_credit_stop_is_saved_for_ahead_of_time_and_dropped_when_topped_up(
    jp_fetch: Any, jp_asyncio_loop: Any, jp_serverapp: Any
) -> None:
    ext = extension(jp_serverapp)
    stops: list[str] = []
    ext.stop_server = stops.append
    now = ext.clock()
    ext.clock = lambda: now
    stop_at = now + timedelta(seconds=90)
    alloc = {"gpu_count": 1, "price_per_gpu_hour": 1, "stopping_at": stop_at.isoformat()}
    # 90 s away, asked 60 s ahead (save_lead_seconds): not yet.
    ext.follow_credit_stop(PortalReading(reachable=True, allocation=alloc), now)
    assert ext.saves.current is None
    ext.clock = lambda: now + timedelta(seconds=31)
    ext.follow_credit_stop(
        PortalReading(reachable=True, allocation={**alloc, "stop_reason": "quota_exhausted"}),
        ext.clock(),
    )
    assert ext.saves.current is not None
    assert (ext.saves.current.reason, ext.saves.current.stop_at) == ("quota_exhausted", stop_at)
    # A stale reading (portal down) keeps the request; a fresh one without a stop drops it.
    running = {**alloc, "stopping_at": None}
    ext.follow_credit_stop(PortalReading(reachable=False, stale=True, allocation=running), now)
    assert ext.saves.current is not None
    ext.follow_credit_stop(PortalReading(reachable=True, allocation=running), now)
    assert ext.saves.current is None
    jp_asyncio_loop.run_until_complete(asyncio.wait_for(ext._stop_task, 10))
    assert stops == []


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ("not json", 400),
        ([], 400),
        ({"saved": []}, 400),
        ({"id": "x", "saved": "a.ipynb"}, 400),
        ({"id": "x", "failed": [1]}, 400),
    ],
)
def test_a_malformed_acknowledgement_is_refused(
    jp_fetch: Any, jp_asyncio_loop: Any, body: Any, code: int
) -> None:
    raw = body if isinstance(body, str) else json.dumps(body)
    with pytest.raises(HTTPClientError) as refused:
        fetch(jp_asyncio_loop, jp_fetch, "api", "gpuportal", "save-ack", method="POST", body=raw)
    assert refused.value.code == code


def test_an_acknowledgement_needs_a_login_and_an_unknown_id_does_nothing(
    jp_fetch: Any, jp_asyncio_loop: Any
) -> None:
    with pytest.raises(HTTPClientError) as refused:
        fetch(
            jp_asyncio_loop,
            jp_fetch,
            "api",
            "gpuportal",
            "save-ack",
            method="POST",
            body=json.dumps({"id": "x"}),
            headers={"Authorization": "token wrong"},
        )
    assert refused.value.code == 403
    assert json.loads(ack(jp_asyncio_loop, jp_fetch, {"id": "x"}).body) == {"acknowledged": False}


def test_the_idle_stop_writes_the_stop_marker_the_spawner_reads(
    jp_asyncio_loop: Any, jp_serverapp: Any, capfd: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gpuportal.provider.stopmarker import stop_reason

    ext = extension(jp_serverapp)
    stopped: list[bool] = []
    monkeypatch.setattr(jp_serverapp, "stop", lambda *a, **k: stopped.append(True))
    start = ext.clock()
    ext.clock = lambda: start + timedelta(minutes=31)
    capfd.readouterr()
    assert jp_asyncio_loop.run_until_complete(ext.check_idle()) is True
    ext.saves.acknowledge(ext.saves.current.id, ext.clock(), [], [])
    jp_asyncio_loop.run_until_complete(asyncio.wait_for(ext._stop_task, 10))
    assert stopped == [True]
    err = capfd.readouterr().err
    markers = [line for line in err.splitlines() if line.startswith("gpuportal-stop:")]
    assert len(markers) == 1, err  # 31 min after the server's start, give or take its start-up
    assert stop_reason(err).startswith("it was idle for 31 min"), markers
