"""A customer's notebook reaches no secret of the control plane, no other customer
and no Ray credential: probed from inside real kernels of ``gpuportal up`` (the
code path of ``make run``), on a CPU server and on a GPU server of the house node.

The control plane is started with marker secrets in its environment. Each
kernel then looks everywhere a hostile customer would: its environment, every
``/proc/*/environ`` and ``cmdline`` it can read, every file it can read under the
data dir, the homes, ``/tmp`` and Ray's temp dir, the Ray Jobs API, and the other
customer's server. Positive controls (the kernel finds its own token in its own
environment; the test process, as root, finds the secrets where they are) show
the probe can find what it looks for.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from .portal_stack import Stack, hub_login, hub_token, start_stack, stop_stack
from .spawner.kernel import run_code

pytestmark = [pytest.mark.slow, pytest.mark.ray]

MARKER_ENV = "ISOLATION_MARKER_SECRET"
MARKER_SETTING = "GPUPORTAL_MARKER_SECRET"

PROBE = r"""
import json, os, urllib.request, urllib.error
SECRETS = json.loads(SECRETS_JSON)
ROOTS = json.loads(ROOTS_JSON)
found = {}
def check(where, text):
    for name, value in SECRETS.items():
        if value and value in text:
            found.setdefault(name, []).append(where)
check("environ", "\n".join(f"{k}={v}" for k, v in os.environ.items()))
pids = [p for p in os.listdir("/proc") if p.isdigit()]
for pid in pids:
    for part in ("environ", "cmdline"):
        try:
            with open(f"/proc/{pid}/{part}", "rb") as f:
                check(f"/proc/{pid}/{part}", f.read().decode("latin-1"))
        except OSError:
            pass
readable, budget = [], 20000
for root in ROOTS:
    for dirpath, dirs, files in os.walk(root):
        for name in files:
            budget -= 1
            if budget < 0:
                break
            path = os.path.join(dirpath, name)
            try:
                with open(path, "rb") as f:
                    data = f.read(4_000_000)
            except OSError:
                continue
            readable.append(path)
            check(path, data.decode("latin-1"))
def status(method, url, body=None):
    req = urllib.request.Request(url, method=method, data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as reply:
            check(f"{method} {url}", reply.read(4_000_000).decode("latin-1"))
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError as exc:
        return type(exc).__name__
jobs = JOBS_URL
submit = json.dumps({"entrypoint": "echo pwned", "entrypoint_num_gpus": 1}).encode()
hub_environ = "readable"
try:
    open(f"/proc/{HUB_PID}/environ", "rb").read()
except OSError as exc:
    hub_environ = type(exc).__name__
print(json.dumps({
    "uid": os.getuid(),
    "found": found,
    "readable": [
        p for p in readable
        if p.startswith(tuple(ROOTS[:2])) and not p.startswith(os.environ["HOME"] + "/")
    ][:50],
    "pids": len(pids),
    "hub_environ": hub_environ,
    "jobs_list": status("GET", jobs + "/api/jobs/"),
    "jobs_submit": status("POST", jobs + "/api/jobs/", submit),
    "gpus": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
}))
"""


def _call(stack: Stack, token: str, method: str, path: str, **kw: Any) -> httpx.Response:
    return httpx.request(
        method,
        stack.base_url + path,
        headers={"Authorization": f"token {token}"},
        timeout=60,
        **kw,
    )


def _spawn(stack: Stack, token: str, user: str, options: dict[str, Any]) -> None:
    reply = _call(stack, token, "POST", f"/hub/api/users/{user}/server", json=options)
    assert reply.status_code in (201, 202), reply.text
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        model = _call(stack, token, "GET", f"/hub/api/users/{user}").json()
        server = model["servers"].get("")
        if server and server.get("ready"):
            return
        if not server:
            raise AssertionError(f"{user}'s server went away while starting: {model}")
        time.sleep(1)
    raise AssertionError(f"{user}'s server not ready in time")


@pytest.fixture(scope="module")
def probed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The stack with marker secrets, alice on a CPU server and bob on a GPU server."""
    markers = {
        MARKER_ENV: "marker-env-" + secrets.token_hex(8),
        MARKER_SETTING: "marker-setting-" + secrets.token_hex(8),
    }
    stack = start_stack(
        tmp_path_factory.mktemp("isolation") / "data",
        timeout=300,
        GPUPORTAL_SIGNUP_CREDIT_POLICY="identity",  # the sign-up credit pays for bob's GPU
        **markers,
    )
    try:
        tokens = {}
        for name in ("alice", "bob"):
            browser = hub_login(stack.base_url, name, f"pw-{name}-12345")
            try:
                tokens[name] = hub_token(browser, name)
            finally:
                browser.close()
        _spawn(stack, tokens["alice"], "alice", {"profile": "cpu"})
        _spawn(stack, tokens["bob"], "bob", {"profile": "gpu", "gpu_count": "1"})
        yield {"stack": stack, "tokens": tokens, "markers": markers}
    finally:
        stop_stack(stack)


def _server_token(probed: dict[str, Any], user: str) -> str:
    stack, token = probed["stack"], probed["tokens"][user]
    code = "import os; print(os.environ['JUPYTERHUB_API_TOKEN'])"
    return run_code(f"{stack.base_url}/user/{user}/", token, code).strip()


def _probe(probed: dict[str, Any], user: str, other: str) -> dict[str, Any]:
    stack: Stack = probed["stack"]
    data = stack.data_dir
    ray = json.loads((data / "run" / "ray.json").read_text())
    hub_pid = json.loads((data / "run" / "stack.json").read_text())["hub_pid"]
    found_secrets = {
        **probed["markers"],
        "admin_password": stack.admin_password,
        "ray_token": (data / "ray-auth-token").read_text().strip(),
        "spawner_token": (data / "ray-spawner-token").read_text().strip(),
        "cookie_secret": (data / "jupyterhub_cookie_secret").read_text().strip(),
        "other_server_token": _server_token(probed, other),
        "own_server_token": _server_token(probed, user),
    }
    # The data dir, every customer's home, and /tmp (Ray's temp dir is there).
    roots = [str(data), str(data.parent / f"{data.name}-homes"), "/tmp"]
    code = (
        PROBE.replace("SECRETS_JSON", repr(json.dumps(found_secrets)))
        .replace("ROOTS_JSON", repr(json.dumps(roots)))
        .replace("JOBS_URL", repr(ray["jobs_url"]))
        .replace("HUB_PID", str(int(hub_pid)))
    )
    out = run_code(f"{stack.base_url}/user/{user}/", probed["tokens"][user], code, timeout=240)
    return {"result": json.loads(out.strip().splitlines()[-1]), "secrets": found_secrets}


@pytest.mark.parametrize(("user", "other"), [("alice", "bob"), ("bob", "alice")])
def test_a_kernel_finds_no_secret_of_the_control_plane_or_the_other_customer(
    probed: dict[str, Any], user: str, other: str
) -> None:
    probe = _probe(probed, user, other)
    result = probe["result"]
    # Positive control: the probe does find what is there to find, and only in the
    # customer's own processes and own home.
    own = result["found"].get("own_server_token", [])
    assert "environ" in own, result["found"]
    home = str(probed["stack"].data_dir.parent / f"{probed['stack'].data_dir.name}-homes")
    assert all(w == "environ" or w.startswith(("/proc/", home)) for w in own), own
    leaked = {k: v for k, v in result["found"].items() if k != "own_server_token"}
    assert leaked == {}
    # It runs as the customer's own unprivileged account, not the control plane's.
    assert result["uid"] != 0
    assert result["readable"] == []
    # Its sandbox shows it no other process, and the hub's environment is out of reach.
    assert result["pids"] < 20
    assert result["hub_environ"] in ("FileNotFoundError", "PermissionError")
    # Ray's Jobs API refuses a call without the cluster's token: no listing, no submit.
    assert result["jobs_list"] in (401, 403)
    assert result["jobs_submit"] in (401, 403)


def test_the_control_plane_holds_the_markers_and_keeps_its_data_dir_private(
    probed: dict[str, Any],
) -> None:
    """The hub process really has the marker secrets in its environment (so the
    kernels' empty answer means something), and its data dir is 0700 with 0600 files."""
    import psutil

    stack: Stack = probed["stack"]
    hub_pid = json.loads((stack.data_dir / "run" / "stack.json").read_text())["hub_pid"]
    hub_env = psutil.Process(int(hub_pid)).environ()
    for name, value in probed["markers"].items():
        assert hub_env.get(name) == value, name
    assert (stack.data_dir / "ray-auth-token").read_text().strip()
    assert stack.data_dir.stat().st_mode & 0o777 == 0o700
    for path in stack.data_dir.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert path.stat().st_mode & 0o077 == 0, path


def test_another_customers_server_refuses_this_customers_token(probed: dict[str, Any]) -> None:
    stack: Stack = probed["stack"]
    for user, other in (("alice", "bob"), ("bob", "alice")):
        own = _call(stack, probed["tokens"][user], "GET", f"/user/{user}/api/contents")
        assert own.status_code == 200, own.text
        theirs = _call(stack, probed["tokens"][user], "GET", f"/user/{other}/api/contents")
        assert theirs.status_code == 403, theirs.text


def test_the_gpu_server_sees_exactly_its_reserved_gpu(probed: dict[str, Any]) -> None:
    stack: Stack = probed["stack"]
    code = "import os; print(os.environ.get('CUDA_VISIBLE_DEVICES', ''))"
    bob = run_code(f"{stack.base_url}/user/bob/", probed["tokens"]["bob"], code).strip()
    alice = run_code(f"{stack.base_url}/user/alice/", probed["tokens"]["alice"], code).strip()
    assert bob in {"0", "1"}
    assert alice == ""


def test_reservations_shown_to_customers_carry_no_internal_url(probed: dict[str, Any]) -> None:
    stack: Stack = probed["stack"]
    reply = _call(stack, probed["tokens"]["bob"], "GET", "/services/portal/api/v1/reservations")
    assert reply.status_code == 200, reply.text
    text = reply.text
    assert reply.json(), "bob's GPU server holds a reservation"
    assert "jobs_url" not in text and "ray_token" not in text
    assert (stack.data_dir / "ray-auth-token").read_text().strip() not in text
