"""Why a server stopped on its own: the stop marker and the spawner's record of it.

The marker line is written by the server extension before its idle stop and read
by the spawner from the job's log (``provider/stopmarker.py``). The log is the
user's own, so hostile lines are part of the table.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gpuportal.provider import stopmarker
from gpuportal.provider.stopmarker import ON_ITS_OWN, idle_marker, stop_reason
from gpuportal.spawners import spawner as spawner_module
from gpuportal.spawners.rayjobs import JobState, RayUnavailable
from gpuportal.spawners.spawner import STATE_VERSION, STATE_VERSION_KEY, RaySpawner

IDLE_30_MIN = "it was idle for 30 min (no kernel or GPU was busy)"


@pytest.mark.parametrize(
    ("log", "reason"),
    [
        ("", ON_ITS_OWN),
        ("[I 12:00] Jupyter Server is running\n", ON_ITS_OWN),
        (idle_marker(1800) + "\n", IDLE_30_MIN),
        (f"noise\n{idle_marker(1800.7)}\n[I] Shutting down 1 kernel\n", IDLE_30_MIN),
        (idle_marker(5), "it was idle for less than a minute (no kernel or GPU was busy)"),
        (idle_marker(3725), "it was idle for 1 h 2 min (no kernel or GPU was busy)"),
        # Only the last marker counts: a fake one printed earlier is overridden...
        ("gpuportal-stop: idle for 99 s\n" + idle_marker(1800), IDLE_30_MIN),
        # ...and a fake one printed last can only say something from the allow-list.
        (idle_marker(1800) + "\ngpuportal-stop: idle for 60 s\n", IDLE_30_MIN.replace("30", "1")),
        (idle_marker(1800) + "\ngpuportal-stop: out_of_credit\n", ON_ITS_OWN),
        ("gpuportal-stop: your credit ran out\n", ON_ITS_OWN),
        ("gpuportal-stop: quota_exhausted", ON_ITS_OWN),
        ("gpuportal-stop: <script>alert(1)</script>", ON_ITS_OWN),
        ("gpuportal-stop: idle for <b>5</b> s", ON_ITS_OWN),
        ("gpuportal-stop: idle for 60 s <img src=x onerror=alert(1)>", ON_ITS_OWN),
        ("gpuportal-stop: idle for 60 s because the admin said so", ON_ITS_OWN),
        ("gpuportal-stop: idle for -5 s", ON_ITS_OWN),
        ("gpuportal-stop: idle for 1e9 s", ON_ITS_OWN),
        ("gpuportal-stop: idle for ٣٠ s", ON_ITS_OWN),  # non-ASCII digits
        ("gpuportal-stop: idle for 9999999999 s", ON_ITS_OWN),  # too many digits
        ("gpuportal-stop: idle for 999999999 s", ON_ITS_OWN),  # more than a year
        ("gpuportal-stop: idle for " + "1" * 100_000 + " s", ON_ITS_OWN),
        ("gpuportal-stop: " + "x" * 1_000_000, ON_ITS_OWN),
        ("echo gpuportal-stop: idle for 60 s", ON_ITS_OWN),  # not at a line's start
    ],
)
def test_the_reason_comes_from_the_last_marker_and_an_allow_list(log: str, reason: str) -> None:
    assert stop_reason(log) == reason


def test_every_reason_is_short_plain_text_even_for_a_huge_hostile_log() -> None:
    hostile = "\n".join(
        ["gpuportal-stop: <b>" + "A" * 10_000, "gpuportal-stop: idle for 1 s\x00<", "\r" * 50]
    )
    for log in (hostile, "\n" * 100_000, idle_marker(10**6)):
        reason = stop_reason(log)
        assert len(reason) <= 80
        assert not set(reason) & set("<>&\"'\x00")


def test_the_extension_marker_is_what_the_parser_reads() -> None:
    assert idle_marker(1800.9) == "gpuportal-stop: idle for 1800 s"
    assert stopmarker.last_marker(idle_marker(42)) == "idle for 42 s"


# --- the spawner records and clears it ---------------------------------------------


class FakeUser:
    name = "a-b"
    url = "/user/a-b/"


class FakeJobs:
    """The Jobs API of one cluster, as the spawner sees it (rayjobs.RayJobs)."""

    def __init__(self, status: str, log: str = "", log_fails: bool = False) -> None:
        self.status = status
        self.log = log
        self.log_fails = log_fails
        self.logs_read: list[str] = []
        self.stopped: list[str] = []

    async def state(self, job_id: str) -> JobState:
        return JobState(self.status, "", "node1")

    async def node_alive(self, node_id: str) -> bool:
        return True

    async def logs_tail(self, job_id: str, chars: int = 2000) -> str:
        self.logs_read.append(job_id)
        if self.log_fails:
            raise RayUnavailable("the cluster went away")
        return self.log[-chars:]

    async def stop(self, job_id: str) -> bool:
        self.stopped.append(job_id)
        self.status = "STOPPED"
        return True


URL = "http://cpu-cluster.invalid:8265"


@pytest.fixture
def jobs(monkeypatch: pytest.MonkeyPatch) -> Any:
    def install(fake: FakeJobs) -> RaySpawner:
        spawner = RaySpawner(user=FakeUser(), cpu_jobs_url=URL)  # type: ignore[arg-type]
        key = (URL, spawner_module._digest(""), spawner.ray_timeout)
        monkeypatch.setitem(spawner_module._JOBS_CLIENTS, key, fake)
        spawner.jobs_url, spawner.cluster_id, spawner.job_id = URL, "cpu", "job-1"
        spawner.url = "http://127.0.0.1:1"
        return spawner

    return install


def test_a_server_idle_culled_records_the_reason_and_it_survives_clear_state(jobs: Any) -> None:
    fake = FakeJobs("SUCCEEDED", log="[I] up\n" + idle_marker(1800) + "\n[I] bye\n")
    spawner = jobs(fake)
    assert asyncio.run(spawner.poll()) == 0
    assert spawner.stopped_reason == IDLE_30_MIN
    assert fake.logs_read == ["job-1"]
    assert spawner.job_id == ""  # cleaned up in poll()
    spawner.clear_state()  # what the hub does next
    state = spawner.get_state()
    assert state == {"stopped_reason": IDLE_30_MIN, STATE_VERSION_KEY: STATE_VERSION}
    restarted = RaySpawner(user=FakeUser())  # type: ignore[arg-type]
    restarted.load_state(state)
    assert restarted.stopped_reason == IDLE_30_MIN
    assert asyncio.run(restarted.poll()) == 0  # nothing left to poll, nothing recorded
    assert restarted.stopped_reason == IDLE_30_MIN


def test_a_job_that_exited_without_a_marker_stopped_on_its_own(jobs: Any) -> None:
    spawner = jobs(FakeJobs("FAILED", log="Traceback ...\nKeyboardInterrupt\n"))
    assert asyncio.run(spawner.poll()) == 1
    assert spawner.stopped_reason == ON_ITS_OWN


def test_an_unreadable_log_is_logged_not_raised(jobs: Any) -> None:
    spawner = jobs(FakeJobs("SUCCEEDED", log_fails=True))
    assert asyncio.run(spawner.poll()) == 0
    assert spawner.stopped_reason == ON_ITS_OWN
    assert spawner.job_id == ""


def test_a_running_server_records_nothing(jobs: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeJobs("RUNNING", log=idle_marker(1800))
    spawner = jobs(fake)

    async def answers() -> bool:
        return True

    monkeypatch.setattr(spawner, "_answers", answers)
    assert asyncio.run(spawner.poll()) is None
    assert (spawner.stopped_reason, fake.logs_read) == ("", [])


def test_a_stop_the_hub_asked_for_has_no_reason_and_clears_an_old_one(jobs: Any) -> None:
    fake = FakeJobs("RUNNING", log=idle_marker(1800))
    spawner = jobs(fake)
    spawner.stopped_reason = ON_ITS_OWN  # from an earlier session
    asyncio.run(spawner.stop())
    assert fake.stopped == ["job-1"]
    assert (spawner.stopped_reason, fake.logs_read) == ("", [])
    assert "stopped_reason" not in spawner.get_state()


def test_the_next_start_clears_the_reason(jobs: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    spawner = jobs(FakeJobs("SUCCEEDED", log=idle_marker(1800)))
    asyncio.run(spawner.poll())
    assert spawner.stopped_reason == IDLE_30_MIN

    async def started() -> str:
        return "http://127.0.0.1:2"

    monkeypatch.setattr(spawner, "_start", started)
    assert asyncio.run(spawner.start()) == "http://127.0.0.1:2"
    assert spawner.stopped_reason == ""


def test_a_reason_read_back_from_a_state_is_bounded() -> None:
    spawner = RaySpawner(user=FakeUser())  # type: ignore[arg-type]
    spawner.load_state({"stopped_reason": "x" * 10_000})
    assert len(spawner.stopped_reason) == spawner_module.MAX_REASON_CHARS
