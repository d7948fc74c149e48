"""Run code in a kernel of a user server (REST + the kernel's websocket), for tests."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime

import httpx
import websocket


def run_code(server_url: str, token: str, code: str, timeout: float = 60.0) -> str:
    """Start a kernel at ``server_url`` (…/user/<name>/), run ``code``, return its stdout."""
    headers = {"Authorization": f"token {token}"}
    base = server_url.rstrip("/")
    kernel = httpx.post(
        f"{base}/api/kernels", headers=headers, json={"name": "python3"}, timeout=30
    )
    kernel.raise_for_status()
    kernel_id = kernel.json()["id"]
    ws_url = base.replace("http://", "ws://", 1) + f"/api/kernels/{kernel_id}/channels"
    conn = websocket.create_connection(
        ws_url, header=[f"Authorization: token {token}"], timeout=timeout
    )
    try:
        msg_id = uuid.uuid4().hex
        conn.send(
            json.dumps(
                {
                    "header": {
                        "msg_id": msg_id,
                        "username": "test",
                        "session": uuid.uuid4().hex,
                        "msg_type": "execute_request",
                        "version": "5.3",
                        "date": datetime.now(UTC).isoformat(),
                    },
                    "parent_header": {},
                    "metadata": {},
                    "channel": "shell",
                    "buffers": [],
                    "content": {
                        "code": code,
                        "silent": False,
                        "store_history": False,
                        "user_expressions": {},
                        "allow_stdin": False,
                        "stop_on_error": True,
                    },
                }
            )
        )
        out: list[str] = []
        deadline = time.monotonic() + timeout
        for _ in range(1000):
            if time.monotonic() > deadline:
                raise TimeoutError("the kernel did not finish in time")
            msg = json.loads(conn.recv())
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind = msg.get("msg_type")
            if kind == "stream":
                out.append(msg["content"]["text"])
            elif kind == "error":
                raise AssertionError("kernel error: " + msg["content"].get("evalue", ""))
            elif kind == "status" and msg["content"].get("execution_state") == "idle":
                break
        return "".join(out)
    finally:
        conn.close()
        httpx.delete(f"{base}/api/kernels/{kernel_id}", headers=headers, timeout=30)
