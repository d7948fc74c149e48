"""``gpuportal-singleuser``: the entrypoint of a user server's Ray job, on the provider node.

It claims the server's hub token from the hub with the one-time claim the
spawner put in the job (the token itself never travels in the job's runtime
env, which anyone who may list jobs can read), picks a free port, and starts
``jupyterhub-singleuser`` (from this same Python environment) **as the
customer**: under the customer's own OS account when the node runs as root,
inside a bubblewrap sandbox where the node has one (``provider/isolation.py``),
from a fresh environment built from an allow-list — never a copy of its own,
which holds Ray's variables and the path of the cluster's Ray token. It waits
until the port accepts connections and reports the port to the hub with the
server's token, as batchspawner's wrapper does. It then waits for the server
and exits with its status, so the Ray job's status is the server's.

Fate sharing: Ray's job supervisor kills the entrypoint's process group when
it dies; on top of that this wrapper asks Linux to SIGTERM it when its parent
dies, and its server child likewise, so a lost node or supervisor leaves no
server running.

Node-side code: it runs next to customer code on a provider's machine, so it
never imports ``gpuportal.hub`` and reads only the ``JUPYTERHUB_*`` and
``GPUPORTAL_SINGLEUSER_*`` variables the spawner put in the job's runtime env
(and ``GPUPORTAL_NODE_HOMES``, the node's own choice of where homes live).
"""

from __future__ import annotations

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
from types import FrameType
from typing import Any

from gpuportal.provider import isolation
from gpuportal.provider.ports import free_port
from gpuportal.provider.serverenv import SERVER_ENV_ALLOW, die_with_parent, server_env

__all__ = ["SERVER_ENV_ALLOW", "die_with_parent", "main", "server_env"]

REPORT_PATH = "gpuportal/report"
CLAIM_PATH = "gpuportal/claim"
ENV_IP = "GPUPORTAL_SINGLEUSER_IP"
ENV_JOB_ID = "GPUPORTAL_SINGLEUSER_JOB_ID"
ENV_READY_TIMEOUT = "GPUPORTAL_SINGLEUSER_READY_TIMEOUT"
ENV_CLAIM = "GPUPORTAL_SINGLEUSER_CLAIM"
#: The GPU indices the marketplace reserved: the server sees these, as a warm server
#: does, rather than whichever of the node's GPUs Ray picked for the job.
ENV_GPUS = "GPUPORTAL_SINGLEUSER_GPUS"


def _say(message: str) -> None:
    # Goes to the Ray job's log; never print the token or the env.
    print(f"gpuportal-singleuser: {message}", file=sys.stderr, flush=True)


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


def _post(
    api_url: str, path: str, body: dict[str, object], token: str | None, attempts: int
) -> Any:
    """POST JSON to the hub API, retrying with backoff on network errors and 5xx;
    returns the JSON answer; RuntimeError on a 4xx or the final failure."""
    url = f"{api_url.rstrip('/')}/{path}"
    if not url.startswith(("http://", "https://")):
        raise ValueError("JUPYTERHUB_API_URL is not an http(s) URL")
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"token {token}"
    delay = 0.25
    for attempt in range(attempts):
        request = urllib.request.Request(  # noqa: S310 (scheme checked above)
            url, data=data, method="POST", headers=headers
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as reply:  # noqa: S310
                if reply.status in (200, 201):
                    raw = reply.read(65536)
                    return json.loads(raw) if raw else {}
        except urllib.error.HTTPError as exc:
            if 400 <= exc.code < 500:
                raise RuntimeError(f"the hub refused {path} ({exc.code})") from None
        except (OSError, ValueError):
            pass
        if attempt + 1 < attempts:
            time.sleep(delay)
            delay = min(delay * 2, 4.0)
    raise RuntimeError(f"the hub did not answer {path}")


def report(api_url: str, token: str, body: dict[str, object], attempts: int = 8) -> None:
    """POST the report to the hub with the server's token; raises on final failure."""
    _post(api_url, REPORT_PATH, body, token, attempts)


def claim_token(api_url: str, job_id: str, claim: str, attempts: int = 8) -> str:
    """Trade the job's one-time claim for the server's hub token. The hub answers a
    claim once; a second try (someone else's, or ours after theirs) is refused."""
    answer = _post(api_url, CLAIM_PATH, {"job_id": job_id, "claim": claim}, None, attempts)
    token = answer.get("token") if isinstance(answer, dict) else None
    if not isinstance(token, str) or not token:
        raise RuntimeError("the hub's claim answer holds no token")
    return token


def isolate(hub_user: str) -> tuple[isolation.Account, str | None]:
    """The account the server runs as, and the sandbox to run it in (or None).

    Raises IsolationError when the node can keep customer code neither under an
    account of its own nor in a sandbox.
    """
    homes = isolation.default_homes()
    bwrap = isolation.bwrap_path()
    if os.geteuid() == 0:
        account = isolation.ensure_account(hub_user, homes)
    else:
        if bwrap is None:
            raise isolation.IsolationError(
                "this node can neither run servers under their own accounts (it does not "
                "run as root) nor sandbox them (bubblewrap is not installed)"
            )
        account = isolation.current_account(hub_user, homes)
    if bwrap and not isolation.sandbox_works(bwrap, account):
        _say("bubblewrap is installed but cannot start a sandbox here (user namespaces?)")
        if os.geteuid() != 0:
            raise isolation.IsolationError("the sandbox, required on this node, does not start")
        bwrap = None
    return account, bwrap


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    die_with_parent()
    source = dict(os.environ)
    reserved = source.get(ENV_GPUS, "")
    if reserved and all(part.isdigit() for part in reserved.split(",")):
        source["CUDA_VISIBLE_DEVICES"] = reserved
    api_url = source.get("JUPYTERHUB_API_URL", "")
    claim = source.get(ENV_CLAIM, "")
    user = source.get("JUPYTERHUB_USER", "")
    job_id = source.get(ENV_JOB_ID, "")
    if not api_url or not claim or not user:
        _say(
            f"JUPYTERHUB_API_URL, JUPYTERHUB_USER and {ENV_CLAIM} must be set "
            "(start me from the hub)."
        )
        return 2
    try:
        account, bwrap = isolate(user)
    except isolation.IsolationError as exc:
        _say(f"refusing to start a server: {exc}.")
        return 5
    try:
        token = claim_token(api_url, job_id, claim)
    except (RuntimeError, ValueError) as exc:
        _say(f"could not claim the server's token: {exc}; stopping.")
        return 4
    ip = source.get(ENV_IP, "127.0.0.1")
    port = free_port(ip)
    prefix = source.get("JUPYTERHUB_SERVICE_PREFIX", "/")
    host = f"[{ip}]" if ":" in ip else ip
    env = server_env(source, token, account, f"http://{host}:{port}{prefix}")
    gpus = env.get("CUDA_VISIBLE_DEVICES", "")
    command = [sys.executable, "-m", "jupyterhub.singleuser", *args]
    as_root = os.geteuid() == 0
    if bwrap:
        # As root, bubblewrap mounts as root and the command drops to the customer.
        command = isolation.sandbox_command(
            command, account.home, bwrap, account if as_root else None
        )
    # Without a sandbox, root drops to the customer's account here.
    switch = as_root and not bwrap
    _say(
        f"starting jupyterhub-singleuser on {host}:{port} as {account.name}"
        f"{' in a sandbox' if bwrap else ''} (CUDA_VISIBLE_DEVICES={gpus!r})"
    )
    child = subprocess.Popen(
        command,
        env=env,
        cwd=account.home,
        user=account.uid if switch else None,
        group=account.gid if switch else None,
        extra_groups=[] if switch else None,
        umask=0o077,
        close_fds=True,
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
        report(api_url, token, {"job_id": job_id, "port": port, "gpus": gpus})
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
