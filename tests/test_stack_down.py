"""`gpuportal down` waits for `up` to exit, and an exited, unreaped `up` counts."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

from gpuportal.hub.stack.updown import _wait_exit


def test_an_unreaped_exited_process_counts_as_stopped() -> None:
    # The test is this child's parent and does not reap it: it stays a zombie,
    # as `up` does under a parent (a test, a shell script) that has not waited yet.
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        for _ in range(200):
            if psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE:
                break
            time.sleep(0.05)
        assert psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE
        # `down` is not `up`'s parent: ask from another process, which cannot reap it.
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from gpuportal.hub.stack.updown import _wait_exit; "
                f"print(_wait_exit({child.pid}, timeout=2.0))",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert probe.stdout.strip() == "True", probe.stderr
    finally:
        child.wait()


def test_a_running_process_is_not_stopped_and_a_gone_one_is() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert _wait_exit(child.pid, timeout=0.3) is False
    finally:
        child.kill()
        child.wait()
    assert _wait_exit(child.pid, timeout=0.3) is True
