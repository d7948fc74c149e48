"""A fake portal at the HTTP level and a real JupyterLab server, for the browser tests.

The portal is a real HTTP server on 127.0.0.1 answering the two calls the server
extension makes (``GET api/v1/allocations`` and ``GET api/v1/balance``) from a dict
the test edits; stopping it makes the portal unreachable (connection refused).
JupyterLab is a subprocess (lab_server.py) with its own config, data and settings
folders, JupyterLab's autosave off (so a file on disk was saved by the extension),
and no news or update checks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from ..portal_stack import free_port
from .recordings import DATA

HERE = Path(__file__).parent


@dataclass
class FakePortal:
    """What the portal answers; tests set ``allocation`` (None: no open allocation)."""

    allocation: dict[str, Any] | None = None
    balance: dict[str, Any] = field(default_factory=dict)
    port: int = 0
    server: ThreadingHTTPServer | None = None
    requests: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/services/portal/"

    def start(self) -> None:
        portal = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                portal.requests.append(path)
                if path.endswith("/api/v1/allocations"):
                    body: Any = [portal.allocation] if portal.allocation else []
                elif path.endswith("/api/v1/balance"):
                    body = portal.balance
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port or free_port()), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        """The portal goes away: the extension gets connection refused."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def allocation(started: datetime, **over: Any) -> dict[str, Any]:
    """An open allocation of 1 GPU at 1.20 credits per GPU-hour."""
    return {
        "id": 7,
        "user": "meg",
        "server": "",
        "gpu_count": 1,
        "price_per_gpu_hour": 1_200_000,
        "status": "running",
        "started_at": started.isoformat(),
        "last_charged_at": started.isoformat(),
        "stopping_at": None,
        "stop_reason": None,
        "charged": 0,
        **over,
    }


def balance(available: int, runway: float | None, warning: str | None = None) -> dict[str, Any]:
    return {
        "user": "meg",
        "balance": available,
        "available": available,
        "currency": "credits",
        "rate_per_hour": 1_200_000,
        "runway_seconds": runway,
        "warning": warning,
        "allocations": [],
    }


@dataclass
class Lab:
    url: str
    token: str
    root: Path
    process: subprocess.Popen[bytes]
    log: Path

    def lab_url(self, path: str = "") -> str:
        return f"{self.url}lab{('/tree/' + path) if path else ''}?token={self.token}"


def start_lab(tmp: Path, portal: FakePortal, **traits: Any) -> Lab:
    """JupyterLab on 127.0.0.1 with the extension pointed at ``portal``; bounded start."""
    root, home = tmp / "notebooks", tmp / "home"
    settings = home / "lab-settings" / "@jupyterlab" / "docmanager-extension"
    root.mkdir(exist_ok=True)
    settings.mkdir(parents=True, exist_ok=True)
    (settings / "plugin.jupyterlab-settings").write_text(json.dumps({"autosave": False}))
    # No news, no update check: nothing reaches out, no notification covers the page.
    notices = home / "lab-settings" / "@jupyterlab" / "apputils-extension"
    notices.mkdir(parents=True, exist_ok=True)
    (notices / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False})
    )
    port, token = free_port(), "browser-test-token"
    config = {
        "portal_url": portal.url,
        "api_token": "not-a-real-token",
        "hub_user": "meg",
        "portal_cache_seconds": 0,
        "portal_timeout_seconds": 2,
        "idle_timeout_seconds": 0,
        **traits,
    }
    args = [
        "--ServerApp.ip=127.0.0.1",
        "--LabApp.expose_app_in_browser=True",
        "--LabApp.extension_manager=readonly",
        "--ServerApp.allow_root=True",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        "--ServerApp.open_browser=False",
        f"--ServerApp.root_dir={root}",
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        *(
            f"--GpuPortalExtension.{k}={json.dumps(v) if isinstance(v, list) else v}"
            for k, v in config.items()
        ),
    ]
    env = {
        **os.environ,
        "HOME": str(home),
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "JUPYTER_DATA_DIR": str(home / "data"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(home / "lab-settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
    }
    for key in ("JUPYTERHUB_API_TOKEN", "JUPYTERHUB_USER", "CUDA_VISIBLE_DEVICES"):
        env.pop(key, None)
    log = tmp / "lab.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "lab_server.py"),
                str(DATA / "nvml_a100_kernels.json"),
                *args,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=root,
        )
    lab = Lab(f"http://127.0.0.1:{port}/", token, root, process, log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # bounded: the server answers or the test fails
        if process.poll() is not None:
            raise AssertionError(f"JupyterLab exited at start:\n{log.read_text()[-3000:]}")
        try:
            reply = httpx.get(f"{lab.url}api/status", params={"token": token}, timeout=2)
            if reply.status_code == 200:
                return lab
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_lab(lab)
    raise AssertionError(f"JupyterLab did not answer within 120 s:\n{log.read_text()[-3000:]}")


def stop_lab(lab: Lab) -> None:
    """End the server this test started, by its PID."""
    if lab.process.poll() is None:
        lab.process.terminate()
        try:
            lab.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            lab.process.kill()
            lab.process.wait(timeout=30)


def only_local(page: Any) -> None:
    """The browser may reach 127.0.0.1 only; anything else is aborted."""

    def route(r: Any) -> None:
        host = urlsplit(r.request.url).hostname
        if host == "127.0.0.1" or r.request.url.startswith(("data:", "blob:")):
            r.continue_()
        else:
            r.abort()

    page.route("**/*", route)


def notebook(path: Path, source: str) -> None:
    path.write_text(
        json.dumps(
            {
                "cells": [
                    {
                        "cell_type": "code",
                        "execution_count": None,
                        "id": "c1",
                        "metadata": {},
                        "outputs": [],
                        "source": source,
                    }
                ],
                "metadata": {
                    "kernelspec": {
                        "display_name": "Python 3",
                        "language": "python",
                        "name": "python3",
                    }
                },
                "nbformat": 4,
                "nbformat_minor": 5,
            }
        )
    )


def utcnow() -> datetime:
    return datetime.now(UTC)


def lab_in(tmp: Path, portal: FakePortal, **traits: Any) -> Iterator[Lab]:
    lab = start_lab(tmp, portal, **traits)
    try:
        yield lab
    finally:
        stop_lab(lab)
