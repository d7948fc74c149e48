"""``gpuportal-singleuser``: the entrypoint of a user server's Ray job, on the provider node.

It picks a free port, starts ``jupyterhub-singleuser`` (from this same Python
environment) with the arguments it was given, waits until the port accepts
connections, and reports the port to the hub with the server's own token, as
batchspawner's wrapper does. It then waits for the server and exits with its
status, so the Ray job's status is the server's.

Fate sharing: Ray's job supervisor kills the entrypoint's process group when
it dies; on top of that this wrapper asks Linux to SIGTERM it when its parent
dies, and its server child likewise, so a lost node or supervisor leaves no
server running.

Node-side code: it runs next to customer code on a provider's machine, so it
never imports ``gpuportal.hub`` and reads only the ``JUPYTERHUB_*`` and
``GPUPORTAL_SINGLEUSER_*`` variables the spawner put in the job's runtime env.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

REPORT_PATH = "gpuportal/report"
ENV_IP = "GPUPORTAL_SINGLEUSER_IP"
ENV_JOB_ID = "GPUPORTAL_SINGLEUSER_JOB_ID"
ENV_READY_TIMEOUT = "GPUPORTAL_SINGLEUSER_READY_TIMEOUT"
_PR_SET_PDEATHSIG = 1


def _say(message: str) -> None:
    # Goes to the Ray job's log; never print the token or the env.
    print(f"gpuportal-singleuser: {message}", file=sys.stderr, flush=True)


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def free_port(ip: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET) as sock:
        sock.bind((ip, 0))
        return int(sock.getsockname()[1])


def wait_listening(ip: str, port: int, child: subprocess.Popen[bytes], timeout: float) -> bool:
    host = "127.0.0.1" if ip in ("0.0.0.0", "") else ("::1" if ip == "::" else ip)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            time.sleep(0.2)
    return False


def report(api_url: str, token: str, body: dict[str, object], attempts: int = 8) -> None:
    """POST the report to the hub, retrying with backoff; raises on final failure."""
    url = f"{api_url.rstrip('/')}/{REPORT_PATH}"
    if not url.startswith(("http://", "https://")):
        raise ValueError("JUPYTERHUB_API_URL is not an http(s) URL")
    data = json.dumps(body).encode()
    delay = 0.25
    for attempt in range(attempts):
        request = urllib.request.Request(  # noqa: S310 (scheme checked above)
            url,
            data=data,
            method="POST",
            headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as reply:  # noqa: S310
                if reply.status in (200, 201):
                    return
        except urllib.error.HTTPError as exc:
            if 400 <= exc.code < 500:
                raise RuntimeError(f"the hub refused the report ({exc.code})") from None
        except OSError:
            pass
        if attempt + 1 < attempts:
            time.sleep(delay)
            delay = min(delay * 2, 4.0)
    raise RuntimeError("the hub did not accept the report")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    die_with_parent()
    env = dict(os.environ)
    api_url = env.get("JUPYTERHUB_API_URL", "")
    token = env.get("JUPYTERHUB_API_TOKEN", "")
    if not api_url or not token:
        _say("JUPYTERHUB_API_URL and JUPYTERHUB_API_TOKEN must be set (start me from the hub).")
        return 2
    ip = env.get(ENV_IP, "127.0.0.1")
    port = free_port(ip)
    prefix = env.get("JUPYTERHUB_SERVICE_PREFIX", "/")
    host = f"[{ip}]" if ":" in ip else ip
    env["JUPYTERHUB_SERVICE_URL"] = f"http://{host}:{port}{prefix}"
    root = env.get("JUPYTERHUB_ROOT_DIR")
    if root:
        Path(root).expanduser().mkdir(parents=True, exist_ok=True)
    gpus = env.get("CUDA_VISIBLE_DEVICES", "")
    _say(f"starting jupyterhub-singleuser on {host}:{port} (CUDA_VISIBLE_DEVICES={gpus!r})")
    child = subprocess.Popen(
        [sys.executable, "-m", "jupyterhub.singleuser", *args],
        env=env,
        preexec_fn=lambda: die_with_parent(signal.SIGKILL),
    )

    def forward(signum: int, _frame: FrameType | None) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)

    timeout = float(env.get(ENV_READY_TIMEOUT, "120"))
    if not wait_listening(ip, port, child, timeout):
        code = child.poll()
        _say(f"the server did not start listening (exit status {code}).")
        if code is None:
            child.terminate()
            child.wait(10)
        return 3 if code in (None, 0) else int(code)
    try:
        report(api_url, token, {"job_id": env.get(ENV_JOB_ID, ""), "port": port, "gpus": gpus})
    except (RuntimeError, ValueError) as exc:
        _say(f"could not report to the hub: {exc}; stopping.")
        child.terminate()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
        return 4
    _say("reported to the hub; serving.")
    return child.wait()


if __name__ == "__main__":
    sys.exit(main())
