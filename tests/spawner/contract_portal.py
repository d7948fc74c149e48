"""A stand-in for the portal's marketplace API, following the contract to the letter.

The spawner tests need a portal that reserves GPUs on the *test's own* Ray
nodes and lets a test see every reservation. This one keeps them in memory,
serialises reservations with a lock (so the last GPU goes to exactly one
caller) and checks the ``ray-spawner`` service token. It is a test double for
the marketplace only; Ray, the hub and the servers in these tests are real.

It answers every route the spawner calls (offers, a user's balance, reserve,
get, activate, failed, release) and refuses a user who cannot pay for the minimum billable
period with the real portal's 402 (``payment_required``), using the same
rule: every user starts with the sign-up credit, and a launch needs
``gpu_count x price x min_billable_seconds`` of it (rounded up). The contract
suite (``tests/marketplace/test_portal_contract.py``) runs the same cases
against this double and the real portal app, so the two cannot drift.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


@dataclass
class Node:
    node_id: str
    gpus: int
    gpu_model: str
    region: str
    price: int  # micro-credits per GPU-hour
    jobs_url: str
    cluster_id: int = 1
    vram_gb: int = 80
    ray_token: str = ""  # the cluster's Ray token: trusted callers get it with a reservation
    demo: bool = True


@dataclass
class ContractPortal:
    token: str
    nodes: list[Node] = field(default_factory=list)
    reservations: dict[str, dict[str, Any]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: list[tuple[str, str]] = field(default_factory=list)
    #: What each user may spend, micro-credits (the real portal's sign-up credit by default).
    balances: dict[str, int] = field(default_factory=dict)
    signup_credits: int = 10_000_000
    min_billable_seconds: int = 900
    #: What ``GET /billing-teams`` answers, by user (the real portal's shape).
    billing_teams: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def affords(self, user: str, gpus: int, price: int) -> bool:
        """The real portal's runway rule, for a user with no other servers."""
        needed = -(-gpus * price * self.min_billable_seconds // 3600)
        return self.balances.get(user, self.signup_credits) >= needed

    def used(self, node_id: str) -> list[int]:
        return [
            i
            for r in self.reservations.values()
            if r["node_id"] == node_id and r["status"] in ("held", "active")
            for i in r["gpu_indices"]
        ]

    def live(self) -> list[dict[str, Any]]:
        return [r for r in self.reservations.values() if r["status"] in ("held", "active")]


def error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message, "request_id": "test"}}, status_code=status
    )


def create_app(portal: ContractPortal) -> FastAPI:
    app = FastAPI()
    prefix = "/services/portal/api/v1"

    @app.middleware("http")
    async def auth(request: Request, call_next: Any) -> Any:
        portal.requests.append((request.method, request.url.path))
        if request.headers.get("authorization") != f"token {portal.token}":
            return error(401, "unauthenticated", "Send the ray-spawner token.")
        return await call_next(request)

    @app.get(f"{prefix}/offers")
    async def offers() -> Any:
        with portal.lock:
            return [
                {
                    "gpu_model": n.gpu_model,
                    "vram_gb": n.vram_gb,
                    "region": n.region,
                    "price_per_gpu_hour": n.price,
                    "price_per_gpu_hour_display": f"{n.price / 1e6:.2f}",
                    "free_gpus": n.gpus - len(portal.used(n.node_id)),
                    "largest_free_gpus": n.gpus - len(portal.used(n.node_id)),
                    "total_gpus": n.gpus,
                    "reliability": 1.0,
                    "demo": n.demo,
                    "provider": "house",
                }
                for n in portal.nodes
            ]

    @app.get(f"{prefix}/balance")
    async def balance(user: str = "") -> Any:
        if not user:
            return error(422, "invalid", "Name the user.")
        micro = portal.balances.get(user, portal.signup_credits)
        return {
            "user": user,
            "balance": micro,
            "available": micro,
            "display": f"{micro / 1e6:.2f} credits",
            "currency": "credits",
            "rate_per_hour": 0,
            "runway_seconds": None,
            "warning": None,
            "allocations": [],
            "min_billable_seconds": portal.min_billable_seconds,
        }

    @app.get(f"{prefix}/billing-teams")
    async def billing_teams(user: str = "") -> Any:
        return portal.billing_teams.get(user, [])

    @app.post(f"{prefix}/reservations")
    async def reserve(request: Request) -> Any:
        body = await request.json()
        count = int(body["gpu_count"])
        models = sorted({n.gpu_model for n in portal.nodes})
        if body.get("gpu_model") and body["gpu_model"] not in models:
            return error(
                422,
                "invalid",
                f"Unknown GPU model {body['gpu_model']!r}; the marketplace has: "
                f"{', '.join(models) or 'none yet'}.",
            )
        largest = max(
            (
                n.gpus
                for n in portal.nodes
                if not body.get("gpu_model") or body["gpu_model"] == n.gpu_model
            ),
            default=0,
        )
        if largest and count > largest:
            return error(
                422,
                "invalid",
                f"gpu_count {count} is more than the largest node offers ({largest} GPUs); "
                f"ask for at most {largest}.",
            )
        with portal.lock:
            for r in portal.live():
                if r["user"] == body["user"] and r["server_name"] == body.get("server_name", ""):
                    return JSONResponse(r, status_code=200)
            free_elsewhere = 0
            for node in portal.nodes:
                used = portal.used(node.node_id)
                free = [i for i in range(node.gpus) if i not in used]
                fits = (
                    (not body.get("gpu_model") or body["gpu_model"] == node.gpu_model)
                    and (not body.get("region") or body["region"] == node.region)
                    and (not body.get("max_price") or node.price <= body["max_price"])
                )
                if not fits:
                    free_elsewhere += len(free)
                    continue
                if len(free) >= count:
                    if not portal.affords(body["user"], count, node.price):
                        return error(
                            402,
                            "payment_required",
                            f"Your available balance does not cover {count}x "
                            f"{node.gpu_model} for the minimum billable period; add credits.",
                        )
                    rid = secrets.token_hex(6)
                    portal.reservations[rid] = {
                        "id": rid,
                        "status": "held",
                        "user": body["user"],
                        "server_name": body.get("server_name", ""),
                        "node_id": node.node_id,
                        "cluster_id": node.cluster_id,
                        "jobs_url": node.jobs_url,
                        "ray_token": node.ray_token,
                        "node_resource": f"gpuportal/node:{node.node_id}",
                        "gpu_indices": free[:count],
                        "gpu_count": count,
                        "gpu_model": node.gpu_model,
                        "price_per_gpu_hour": node.price,
                        "region": node.region,
                        "demo": True,
                        "expires_at": time.time() + 300,
                    }
                    return JSONResponse(portal.reservations[rid], status_code=201)
            model = body.get("gpu_model") or "GPU"
            where = f" in {body['region']}" if body.get("region") else ""
            return error(
                409,
                "no_capacity",
                f"No {count}x {model} free{where}; {free_elsewhere} GPUs are free elsewhere.",
            )

    def find(rid: str) -> dict[str, Any] | None:
        return portal.reservations.get(rid)

    @app.get(f"{prefix}/reservations/{{rid}}")
    async def get(rid: str) -> Any:
        r = find(rid)
        return r if r else error(404, "not_found", "No such reservation.")

    @app.post(f"{prefix}/reservations/{{rid}}/activate")
    async def activate(rid: str) -> Any:
        with portal.lock:
            r = find(rid)
            if not r:
                return error(404, "not_found", "No such reservation.")
            if r["status"] == "released":
                return error(409, "released", "This reservation was released.")
            r["status"] = "active"
            return r

    @app.post(f"{prefix}/reservations/{{rid}}/failed")
    async def failed(rid: str, request: Request) -> Any:
        body = await request.json()
        reason = str(body.get("reason", "")).strip()
        if not reason or len(reason) > 500:
            return error(422, "invalid", "body.reason: give a reason of 1 to 500 characters.")
        with portal.lock:
            r = find(rid)
            if not r:
                return error(404, "not_found", "No such reservation.")
            if r.get("failed_at") is None:
                r["failed_at"], r["failure_reason"] = time.time(), reason
                if r["status"] in ("held", "active"):
                    r["status"] = "released"
            return r

    @app.delete(f"{prefix}/reservations/{{rid}}")
    async def release(rid: str) -> Any:
        with portal.lock:
            r = find(rid)
            if not r:
                return error(404, "not_found", "No such reservation.")
            r["status"] = "released"
            return r

    return app


class Served:
    """Run the app with uvicorn in a thread on 127.0.0.1."""

    def __init__(self, app: FastAPI, port: int) -> None:
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Served:
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                return self
            time.sleep(0.05)
        raise RuntimeError("contract portal did not start")

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
