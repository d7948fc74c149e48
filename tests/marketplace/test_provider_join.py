"""A provider joins a running stack with `gpuportal provider join --demo`: real Ray,
real hub, real portal. Heartbeats every 2 s here so going offline is quick to see."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpuportal.provider import signing
from gpuportal.provider.identity import Identity

from .. import portal_stack

pytestmark = [pytest.mark.slow, pytest.mark.ray]

API = "/services/portal/api/v1"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    home = tmp_path_factory.mktemp("provider-site")
    stack = portal_stack.start_stack(
        home / "data",
        GPUPORTAL_DEMO_GPUS="1xA100-80GB",
        GPUPORTAL_HEARTBEAT_SECONDS="2",
        GPUPORTAL_HEARTBEAT_MISSED="3",
        # The joining providers' Ray heads run on this machine's loopback.
        GPUPORTAL_PROVIDER_NETWORKS_ALLOWED="127.0.0.0/8",
    )
    try:
        admin = _login(stack, "admin", stack.admin_password)
        tokens = {"admin": admin}
        for name in ("prov", "prov2", "ann"):
            tokens[name] = _login(stack, name, f"pw-{name}-12345")
        for name in ("prov", "prov2"):
            reply = httpx.post(
                f"{stack.base_url}/hub/api/groups/providers/users",
                json={"users": [name]},
                headers={"Authorization": f"token {admin}"},
                timeout=30,
            )
            assert reply.status_code == 200, reply.text
        time.sleep(2.5)  # the portal's token cache (2 s here) forgets the old role
        yield {"stack": stack, "tokens": tokens, "home": home}
    finally:
        portal_stack.stop_stack(stack)


def _login(stack: Any, name: str, password: str) -> str:
    browser = portal_stack.hub_login(stack.base_url, name, password)
    try:
        return str(portal_stack.hub_token(browser, name))
    finally:
        browser.close()


def gpuportal(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpuportal.hub.stack.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**portal_stack.stack_env(Path("/nonexistent")), "RAY_USAGE_STATS_ENABLED": "0"},
    )


def api(site: dict[str, Any], who: str, method: str, path: str, **kw: Any) -> httpx.Response:
    return httpx.request(
        method,
        site["stack"].base_url + API + path,
        timeout=30,
        headers={"Authorization": f"token {site['tokens'][who]}"},
        **kw,
    )


def node_view(site: dict[str, Any], node_id: str) -> dict[str, Any]:
    views = api(site, "admin", "GET", "/admin/nodes").json()
    return next(v for v in views if v["node_id"] == node_id)


def wait_for(check: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"gave up waiting for {what}")


@pytest.fixture(scope="module")
def joined_agent(site: dict[str, Any]) -> Iterator[tuple[Identity, subprocess.Popen[bytes]]]:
    """``gpuportal provider join`` left running, as a provider runs it: its Ray head
    stays up (the portal cross-checks Ray's own node state) and it heartbeats."""
    config = site["home"] / "prov-node"
    output = site["home"] / "prov-join.log"
    with output.open("wb") as sink:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gpuportal.hub.stack.cli",
                "provider",
                "join",
                "--demo",
                "--demo-gpus",
                "1xL4",
                "--hub",
                site["stack"].base_url,
                "--token",
                site["tokens"]["prov"],
                "--region",
                "eu-west",
                "--price",
                "0.50",
                "--name",
                "Prov GPUs",
                "--config-dir",
                str(config),
            ],
            cwd=ROOT,
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**portal_stack.stack_env(Path("/nonexistent")), "RAY_USAGE_STATS_ENABLED": "0"},
        )
    try:
        wait_for(
            lambda: "sending heartbeats" in output.read_text() or proc.poll() is not None,
            "the node to join and verify",
            timeout=180,
        )
        text = output.read_text()
        assert proc.poll() is None and "verification: passed" in text, text
        yield Identity.load(config), proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)


@pytest.fixture(scope="module")
def joined(joined_agent: tuple[Identity, subprocess.Popen[bytes]]) -> Identity:
    return joined_agent[0]


@pytest.fixture(scope="module")
def agent(
    site: dict[str, Any], joined_agent: tuple[Identity, subprocess.Popen[bytes]]
) -> subprocess.Popen[bytes]:
    """The joined node's agent (the running ``join``), heartbeating."""
    identity, proc = joined_agent
    wait_for(
        lambda: node_view(site, identity.node_id)["status"] == "online", "the agent's heartbeats"
    )
    return proc


def test_join_needs_nvml_or_demo(site: dict[str, Any]) -> None:
    result = gpuportal(
        "provider",
        "join",
        "--hub",
        site["stack"].base_url,
        "--token",
        "x",
        "--config-dir",
        str(site["home"] / "no-gpu"),
    )
    assert result.returncode == 2
    assert result.stderr.startswith("gpuportal provider: NVML")
    assert len(result.stderr.strip().splitlines()) == 1


def test_joined_demo_node_is_verified_and_offered(
    site: dict[str, Any], joined: Identity, agent: subprocess.Popen[bytes]
) -> None:
    view = node_view(site, joined.node_id)
    assert (view["verification"], view["demo"], view["provider"]) == ("verified", True, "Prov GPUs")
    assert (Path(joined.config_dir) / "node.key").stat().st_mode & 0o777 == 0o600
    offers = api(site, "ann", "GET", "/offers").json()
    assert {
        "gpu_model": "L4",
        "vram_gb": 22,
        "region": "eu-west",
        "price_per_gpu_hour": 500_000,
        "price_per_gpu_hour_display": "0.50",
        "free_gpus": 1,
        "largest_free_gpus": 1,
        "total_gpus": 1,
        "reliability": 0.9,
        "demo": True,
        "provider": "Prov GPUs",
        "exclusive": os.geteuid() != 0,  # an agent without root hosts one customer at a time
    } in offers
    status = gpuportal(
        "provider",
        "status",
        "--token",
        site["tokens"]["prov"],
        "--config-dir",
        str(joined.config_dir),
    )
    assert status.returncode == 0, status.stderr
    assert f"node {joined.node_id}: online, verified" in status.stdout
    assert ("EXCLUSIVE" in status.stdout) is (os.geteuid() != 0), status.stdout
    assert node_view(site, joined.node_id)["isolation"] == (
        "user" if os.geteuid() == 0 else "exclusive"
    )


def test_price_pause_resume_and_bounds(
    site: dict[str, Any], joined: Identity, agent: subprocess.Popen[bytes]
) -> None:
    base = ["--token", site["tokens"]["prov"], "--config-dir", str(joined.config_dir)]
    assert gpuportal("provider", "set-price", "0.75", *base).returncode == 0
    too_dear = gpuportal("provider", "set-price", "5000", *base)
    assert too_dear.returncode == 2
    assert too_dear.stderr.strip() == (
        "gpuportal provider: the portal answered 422: price 5000.00/h is outside the "
        "platform's bounds 0.01..1000.00 per GPU-hour (10000..1000000000 micro-credits)."
    )
    assert gpuportal("provider", "pause", *base).returncode == 0
    assert not [o for o in api(site, "ann", "GET", "/offers").json() if o["gpu_model"] == "L4"]
    assert gpuportal("provider", "resume", *base).returncode == 0
    l4 = [o for o in api(site, "ann", "GET", "/offers").json() if o["gpu_model"] == "L4"]
    assert [o["price_per_gpu_hour"] for o in l4] == [750_000]


def test_bad_registrations_are_refused(site: dict[str, Any], joined: Identity) -> None:
    bad_wallet = gpuportal(
        "provider",
        "join",
        "--demo",
        "--no-ray",
        "--jobs-url",
        "http://127.0.0.1:9",
        "--hub",
        site["stack"].base_url,
        "--token",
        site["tokens"]["prov2"],
        "--wallet",
        "not-a-wallet",
        "--config-dir",
        str(site["home"] / "prov2-node"),
        "--once",
    )
    assert bad_wallet.returncode == 2
    assert "is not a Solana public key" in bad_wallet.stderr
    # prov2 claims prov's node (its public key is no secret).
    body = {
        "region": "x",
        "price_per_gpu_hour": 500_000,
        "jobs_url": "http://127.0.0.1:9",
        "node": {
            "node_id": joined.node_id,
            "public_key": joined.public_key,
            "demo": True,
            "gpus": [{"index": 0, "uuid": "u", "model": "L4", "vram_mib": 1}],
        },
    }
    stolen = api(site, "prov2", "POST", "/providers/register", json=body)
    assert stolen.status_code == 422
    assert "belongs to another provider" in stolen.json()["error"]["message"]
    # A customer cannot register at all.
    assert api(site, "ann", "POST", "/providers/register", json=body).status_code == 403


def test_heartbeats_then_offline(
    site: dict[str, Any], joined: Identity, agent: subprocess.Popen[bytes]
) -> None:
    wait_for(
        lambda: (node_view(site, joined.node_id)["latest"] or {}).get("received_at"),
        "a heartbeat in the cache",
    )
    latest = node_view(site, joined.node_id)["latest"]
    assert latest["gpus"][0]["uuid"] == f"GPU-demo-{joined.node_id}-0"
    assert node_view(site, joined.node_id)["status"] == "online"
    agent.send_signal(signal.SIGTERM)
    agent.wait(30)
    wait_for(
        lambda: node_view(site, joined.node_id)["status"] == "offline",
        "the node to go offline after 3 missed heartbeats",
    )
    assert not [o for o in api(site, "ann", "GET", "/offers").json() if o["gpu_model"] == "L4"]


def _send(
    site: dict[str, Any], node_path: str, body: bytes, headers: dict[str, str]
) -> httpx.Response:
    return httpx.post(
        f"{site['stack'].base_url}{API}/nodes/{node_path}/heartbeat",
        content=body,
        headers=headers,
        timeout=30,
    )


def test_bad_heartbeats_are_rejected_and_logged(site: dict[str, Any], joined: Identity) -> None:
    path = f"/services/portal/api/v1/nodes/{joined.node_id}/heartbeat"
    body = json.dumps({"gpus": []}).encode()
    good = joined.sign("POST", path, body)
    assert _send(site, joined.node_id, body, good).status_code == 200
    cases = {
        "node_replayed": good,
        "node_forged": joined.sign("POST", path, b'{"gpus": [{"x": 1}]}'),
        "node_stale": signing.sign(
            joined.key,
            "POST",
            path,
            joined.node_id,
            int(time.time()) - 3600,
            joined.next_counter(),
            body,
        ),
        "node_unsigned": {},
    }
    for code, headers in cases.items():
        reply = _send(site, joined.node_id, body, headers)
        assert reply.status_code == 401, (code, reply.text)
        assert reply.json()["error"]["code"] == code
    wrong = _send(
        site,
        "n-0123456789abcdef",
        body,
        joined.sign("POST", path.replace(joined.node_id, "n-0123456789abcdef"), body),
    )
    assert (wrong.status_code, wrong.json()["error"]["code"]) == (401, "node_wrong_node")
    # The portal's log reaches the file through `up`'s log pump, a moment after the reply.
    reasons = ("replayed", "forged", "stale", "unsigned", "wrong-node")
    missing: list[str] = list(reasons)
    for _ in range(100):  # bounded: at most about 10 s
        log = (site["stack"].data_dir / "logs" / "jupyterhub.log").read_text(errors="replace")
        missing = [r for r in reasons if f"({r})" not in log and f": {r} (" not in log]
        if not missing:
            break
        time.sleep(0.1)
    assert not missing, missing


def test_leave(site: dict[str, Any], joined: Identity) -> None:
    result = gpuportal(
        "provider",
        "leave",
        "--token",
        site["tokens"]["prov"],
        "--config-dir",
        str(joined.config_dir),
    )
    assert result.returncode == 0, result.stderr
    assert node_view(site, joined.node_id)["status"] == "left"
