"""The provider agent: register a node, pass its challenge, keep it alive with heartbeats.

It runs on the provider's machine and talks to the portal over HTTP only:
registration with the provider's hub token, everything after that signed with
the node key. GPU facts come from the NVML seam (``gpuportal.provider.nvml``);
demo nodes declare logical GPUs and run the challenge on the CPU.
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
from dataclasses import dataclass
from typing import Any

import httpx

from . import nvml, workload
from .identity import Identity

log = logging.getLogger("gpuportal.provider")

PORTAL_PREFIX = "/services/portal"
_DEMO = re.compile(r"^\s*(\d+)\s*[xX]\s*([A-Za-z0-9][A-Za-z0-9._-]{0,63})\s*$")

#: VRAM (MiB) declared for demo models whose name does not say it.
DEMO_VRAM_MIB = {
    "A100-80GB": 81920,
    "H100-80GB": 81920,
    "L4": 23034,
    "RTX-4090": 24564,
    "DEMO-GPU": 16384,
}


class AgentError(Exception):
    """A problem the provider can fix; the message is one sentence."""


@dataclass(frozen=True)
class Gpu:
    """A GPU as this node claims it (NVML's view, or a declared demo GPU)."""

    index: int
    uuid: str
    model: str
    vram_mib: int
    cuda_capability: str | None = None
    pci_bus_id: str | None = None

    def claim(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "uuid": self.uuid,
            "model": self.model,
            "vram_mib": self.vram_mib,
            "cuda_capability": self.cuda_capability,
            "pci_bus_id": self.pci_bus_id,
        }

    def inventory(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "uuid": self.uuid,
            "model": self.model,
            "memory_total_mib": self.vram_mib,
        }


def parse_demo(spec: str) -> dict[str, int]:
    models: dict[str, int] = {}
    for part in spec.split(","):
        match = _DEMO.match(part)
        if not match or not 1 <= int(match.group(1)) <= 64:
            raise AgentError(f"--demo-gpus {spec!r} is not COUNTxMODEL, e.g. 2xA100-80GB.")
        models[match.group(2)] = models.get(match.group(2), 0) + int(match.group(1))
    return models


def demo_vram(model: str) -> int:
    if model.upper() in DEMO_VRAM_MIB:
        return DEMO_VRAM_MIB[model.upper()]
    found = re.search(r"(\d+)\s*GB", model, re.IGNORECASE)
    return int(found.group(1)) * 1024 if found else 16384


def inventory(demo: bool, demo_gpus: str, node_id: str) -> tuple[list[Gpu], str | None]:
    """The node's GPUs and driver version. Without NVML: refuse, unless demo."""
    try:
        found = nvml.read_inventory()
    except nvml.NvmlUnavailable as exc:
        if not demo:
            raise AgentError(
                f"NVML is not available here ({exc}); a provider needs NVIDIA "
                "GPUs with their driver. Use --demo to try the marketplace "
                "with logical GPUs."
            ) from None
        found = []
    if found and not demo:
        return [
            Gpu(
                g.index,
                g.uuid,
                nvml.marketplace_model(g.model),
                g.memory_total_mib,
                g.cuda_capability,
                g.pci_bus_id,
            )
            for g in found
        ], found[0].driver_version
    if not demo:
        raise AgentError(
            "NVML found no GPU on this machine; use --demo to try the "
            "marketplace with logical GPUs."
        )
    gpus, index = [], 0
    for model, count in parse_demo(demo_gpus or "1xDEMO-GPU").items():
        for _ in range(count):
            gpus.append(Gpu(index, f"GPU-demo-{node_id}-{index}", model, demo_vram(model)))
            index += 1
    return gpus, None


def models_of(gpus: list[Gpu]) -> dict[str, int]:
    out: dict[str, int] = {}
    for g in gpus:
        out[g.model] = out.get(g.model, 0) + 1
    return out


class Portal:
    """HTTP to the portal: the hub token for provider calls, the node key for node calls."""

    def __init__(
        self,
        hub_url: str,
        identity: Identity | None = None,
        token: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.base = hub_url.rstrip("/") + PORTAL_PREFIX
        self.identity = identity
        self.token = token
        self.client = httpx.Client(timeout=timeout)

    def close(self) -> None:
        self.client.close()

    def _check(self, reply: httpx.Response) -> Any:
        if reply.status_code >= 400:
            try:
                message = reply.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = reply.text[:200] or reply.reason_phrase
            raise AgentError(f"the portal answered {reply.status_code}: {message}")
        return reply.json()

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """A provider call with the hub token."""
        if not self.token:
            raise AgentError("this needs your hub API token: --token or GPUPORTAL_PROVIDER_TOKEN.")
        try:
            reply = self.client.request(
                method,
                self.base + path,
                json=body,
                headers={"Authorization": f"token {self.token}"},
            )
        except httpx.HTTPError as exc:
            raise AgentError(f"cannot reach the portal at {self.base}: {exc}") from None
        return self._check(reply)

    def signed(self, path: str, body: dict[str, Any]) -> Any:
        """A node call, signed with the node key."""
        assert self.identity is not None
        raw = json.dumps(body).encode()
        url = self.base + path
        headers = {
            "Content-Type": "application/json",
            **self.identity.sign("POST", httpx.URL(url).path, raw),
        }
        try:
            reply = self.client.post(url, content=raw, headers=headers)
        except httpx.HTTPError as exc:
            raise AgentError(f"cannot reach the portal at {self.base}: {exc}") from None
        return self._check(reply)


class Agent:
    """Verification and heartbeats for one registered node."""

    def __init__(
        self,
        portal: Portal,
        identity: Identity,
        gpus: list[Gpu],
        demo: bool,
        heartbeat_seconds: float = 10.0,
    ) -> None:
        self.portal = portal
        self.identity = identity
        self.gpus = gpus
        self.demo = demo
        self.heartbeat_seconds = heartbeat_seconds

    @property
    def node_path(self) -> str:
        return f"/api/v1/nodes/{self.identity.node_id}"

    def answer(self, challenge: dict[str, Any]) -> dict[str, Any]:
        """Run the challenge on every GPU and send the results (a failed run is sent too)."""
        log.info(
            "running the verification challenge (%s)",
            "demo: on the CPU" if self.demo else "on the GPUs",
        )
        gpus = [(g.index, g.uuid) for g in self.gpus]
        try:
            results = workload.run_challenge(challenge, gpus)
        except workload.WorkloadUnavailable as exc:
            log.error("cannot run the GPU workload: %s", exc)
            results = [{"index": i, "uuid": u, "rows": ""} for i, u in gpus]
        verdict: dict[str, Any] = self.portal.signed(
            f"{self.node_path}/verification",
            {
                "nonce": challenge["nonce"],
                "inventory": self.current_inventory(),
                "results": results,
            },
        )
        if verdict.get("passed"):
            log.info("verification passed%s", " (demo)" if verdict.get("demo") else "")
        else:
            log.error("verification failed: %s", verdict.get("detail"))
        return verdict

    def current_inventory(self) -> list[dict[str, Any]]:
        if self.demo:
            return [g.inventory() for g in self.gpus]
        return [
            {
                "index": g.index,
                "uuid": g.uuid,
                "model": g.model,
                "memory_total_mib": g.memory_total_mib,
            }
            for g in nvml.read_inventory()
        ]

    def metrics(self) -> list[dict[str, Any]]:
        if self.demo:
            return [
                {
                    "index": g.index,
                    "uuid": g.uuid,
                    "utilization_pct": 0,
                    "memory_used_mib": 0,
                    "memory_total_mib": g.vram_mib,
                    "temperature_c": 0,
                    "power_w": None,
                    "processes": [],
                    "demo": True,
                }
                for g in self.gpus
            ]
        return [m.as_dict() for m in nvml.read_metrics()]

    def verify(self) -> dict[str, Any]:
        """Ask for a challenge and answer it (every agent start does this)."""
        return self.answer(self.portal.signed(f"{self.node_path}/challenge", {}))

    def heartbeat(self) -> dict[str, Any]:
        """One signed heartbeat; answers a challenge if the portal sends one."""
        reply: dict[str, Any] = self.portal.signed(
            f"{self.node_path}/heartbeat", {"gpus": self.metrics()}
        )
        self.heartbeat_seconds = float(reply.get("heartbeat_seconds") or self.heartbeat_seconds)
        if reply.get("challenge"):
            self.answer(reply["challenge"])
        return reply

    def run(self, stop: threading.Event) -> None:
        """Heartbeat until ``stop`` is set; portal outages are logged and retried."""
        failures = 0
        while not stop.is_set():
            try:
                self.heartbeat()
                failures = 0
            except AgentError as exc:
                failures += 1
                log.warning("heartbeat failed (%d in a row): %s", failures, exc)
            # Jitter so a fleet of agents does not beat in step.
            stop.wait(self.heartbeat_seconds * random.uniform(0.9, 1.1))  # noqa: S311
