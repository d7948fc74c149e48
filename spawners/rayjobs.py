"""The spawner's calls to a provider's Ray cluster, over its Jobs API (HTTP).

The hub is never a Ray driver or node of a provider's cluster (Ray gives no
isolation inside a cluster); it only submits, inspects and stops jobs through
``ray.job_submission.JobSubmissionClient`` and reads node state from the
dashboard's state API. The SDK is blocking and has no timeouts of its own, so
each call runs in a thread with a per-request timeout and an outer
``asyncio.wait_for``: no await here can hang the hub.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import httpx
from ray.exceptions import AuthenticationError
from ray.job_submission import JobStatus, JobSubmissionClient

from .loopclient import LoopClient

log = logging.getLogger(__name__)

TERMINAL = {JobStatus.STOPPED, JobStatus.SUCCEEDED, JobStatus.FAILED}


class RayUnavailable(Exception):
    """The cluster's Jobs API did not answer (or answered 5xx)."""


class JobNotFound(Exception):
    """The cluster does not know the job (never submitted, or the cluster was replaced)."""


@dataclass(frozen=True)
class JobState:
    status: str
    message: str
    node_id: str

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


class _BoundedClient(JobSubmissionClient):
    """JobSubmissionClient whose every HTTP request carries a timeout."""

    request_timeout: float = 10.0

    def _do_request(self, method: str, endpoint: str, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", self.request_timeout)
        return super()._do_request(method, endpoint, **kwargs)


class RayJobs:
    """Jobs on one cluster, addressed by its Jobs API URL and authenticated with the
    cluster's Ray token (every cluster runs with Ray's token authentication)."""

    def __init__(self, jobs_url: str, timeout: float = 10.0, token: str = "") -> None:
        self.jobs_url = jobs_url.rstrip("/")
        self.timeout = timeout
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client: _BoundedClient | None = None
        self._http = LoopClient(timeout=timeout, headers=self.headers)
        #: How many SDK clients were made (each makes a version request): one per cluster.
        self.sdk_clients_made = 0

    async def _call(self, fn_name: str, *args: Any, **kwargs: Any) -> Any:
        def run() -> Any:
            if self._client is None:
                client = _BoundedClient.__new__(_BoundedClient)
                client.request_timeout = self.timeout
                # The constructor itself makes a request (version check).
                JobSubmissionClient.__init__(client, self.jobs_url, headers=dict(self.headers))
                self._client = client
                self.sdk_clients_made += 1
            return getattr(self._client, fn_name)(*args, **kwargs)

        try:
            return await asyncio.wait_for(asyncio.to_thread(run), timeout=self.timeout * 2)
        except (TimeoutError, ConnectionError, OSError) as exc:
            raise RayUnavailable(f"{type(exc).__name__} from {self.jobs_url}") from None
        except AuthenticationError:
            # Every cluster runs with Ray's token auth: a wrong or missing token.
            log.error("the cluster at %s refused the spawner's Ray token", self.jobs_url)
            raise RayUnavailable("the cluster refused the Ray token") from None
        except RuntimeError as exc:
            text = str(exc)
            if "status code 404" in text or "does not exist" in text:
                raise JobNotFound(text[:200]) from None
            if "status code 5" in text:
                raise RayUnavailable(text[:200]) from None
            if "status code 401" in text or "status code 403" in text:
                # Every cluster runs with Ray's token auth: a wrong or missing token.
                log.error("the cluster at %s refused the spawner's Ray token", self.jobs_url)
                raise RayUnavailable("the cluster refused the Ray token") from None
            raise
        except Exception as exc:  # requests' own exceptions, without importing requests
            if type(exc).__module__.startswith(("requests", "urllib3")):
                raise RayUnavailable(f"{type(exc).__name__} from {self.jobs_url}") from None
            raise

    async def submit(
        self,
        *,
        submission_id: str,
        entrypoint: str,
        num_cpus: float,
        num_gpus: float,
        resources: dict[str, float],
        env_vars: dict[str, str],
        metadata: dict[str, str],
    ) -> str:
        job_id: str = await self._call(
            "submit_job",
            entrypoint=entrypoint,
            submission_id=submission_id,
            runtime_env={"env_vars": env_vars},
            metadata=metadata,
            entrypoint_num_cpus=num_cpus,
            entrypoint_num_gpus=num_gpus,
            entrypoint_resources=resources or None,
        )
        return job_id

    async def state(self, job_id: str) -> JobState:
        info = await self._call("get_job_info", job_id)
        return JobState(
            str(info.status),
            str(info.message or ""),
            str(getattr(info, "driver_node_id", "") or ""),
        )

    async def list_jobs(self) -> list[dict[str, Any]]:
        """Every job the cluster knows: submission id, status and metadata."""
        jobs = await self._call("list_jobs")
        return [
            {
                "submission_id": str(getattr(job, "submission_id", "") or ""),
                "status": str(getattr(job, "status", "")),
                "metadata": dict(getattr(job, "metadata", None) or {}),
            }
            for job in jobs
        ]

    async def stop(self, job_id: str) -> bool:
        """Ask the job to stop; False when it is unknown or already over."""
        try:
            return bool(await self._call("stop_job", job_id))
        except JobNotFound:
            return False

    async def logs_tail(self, job_id: str, chars: int = 2000) -> str:
        try:
            text = str(await self._call("get_job_logs", job_id))
        except (JobNotFound, RayUnavailable):
            return ""
        return text[-chars:]

    async def _node(self, node_id: str) -> dict[str, Any] | None:
        """The state API's record of one node; None when unknown. Raises RayUnavailable."""
        try:
            reply = await self._http.get(
                f"{self.jobs_url}/api/v0/nodes",
                params={
                    "detail": "1",
                    "filter_keys": "node_id",
                    "filter_predicates": "=",
                    "filter_values": node_id,
                },
            )
            reply.raise_for_status()
            nodes = reply.json()["data"]["result"]["result"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            raise RayUnavailable(f"{type(exc).__name__} from {self.jobs_url}") from None
        return dict(nodes[0]) if nodes else None

    async def node_alive(self, node_id: str) -> bool:
        """Is the node ALIVE? False when DEAD or unknown. Raises RayUnavailable."""
        node = await self._node(node_id)
        return node is not None and node.get("state") == "ALIVE"

    async def node_ip(self, node_id: str) -> str | None:
        node = await self._node(node_id)
        return str(node["node_ip"]) if node and node.get("node_ip") else None
