"""The hub API endpoint where ``gpuportal-singleuser`` reports its port, as batchspawner does.

``POST /hub/api/gpuportal/report`` with the server's own ``JUPYTERHUB_API_TOKEN``.
The token identifies exactly one spawner (the one it was issued to); the
spawner then checks that the report names its current Ray job and a sane
port. The node never chooses the host the hub connects to: the spawner does
(see ``RaySpawner.connect_ip``), so a provider cannot point a user's route at
an arbitrary address.

``POST /hub/api/gpuportal/claim`` is how the wrapper gets that token in the
first place: the spawner puts a one-time claim (not the token) in the job, and
registers it here; the first request that presents it gets the token, and the
claim is gone. A second claim for the same job is refused and fails the spawn,
since someone else has read the job. The token never travels in the job's
runtime env, which the Jobs API shows to whoever may list jobs.

``register()`` adds the handlers to JupyterHub's API handlers (the hub builds its
handler table from ``jupyterhub.apihandlers.default_handlers`` at start). It is
called in one place, when the hub loads ``RaySpawner`` (``spawner.py``).
"""

from __future__ import annotations

import hashlib
import hmac
import weakref
from typing import Any

from jupyterhub.apihandlers import APIHandler, default_handlers
from tornado import web

HANDLER_PATH = r"/api/gpuportal/report"
CLAIM_HANDLER_PATH = r"/api/gpuportal/claim"
MAX_BODY = 4096

#: job id → (sha256 of the claim, the spawner waiting for it). One hub process.
_claims: dict[str, tuple[bytes, weakref.ReferenceType[Any]]] = {}
#: Jobs whose claim was used: a second try is an attack (or a bug) to report.
_claimed: dict[str, tuple[bytes, weakref.ReferenceType[Any]]] = {}


def expect_claim(job_id: str, claim: str, spawner: Any) -> None:
    """Register the one-time ``claim`` the wrapper of ``job_id`` will present."""
    _claimed.pop(job_id, None)
    _claims[job_id] = (hashlib.sha256(claim.encode()).digest(), weakref.ref(spawner))


def forget_claim(job_id: str) -> None:
    """The start is over (ready or failed): its claim, used or not, is void."""
    _claims.pop(job_id, None)
    _claimed.pop(job_id, None)


def take_claim(job_id: str, claim: str) -> Any | None:
    """The spawner whose claim this is, once; None for a wrong, unknown or used claim.

    The right claim presented again means someone else read the job: its spawner
    is told (``claim_conflict``) and fails the start. A wrong claim changes
    nothing, so guessing at job ids cannot fail another user's spawn.
    """
    presented = hashlib.sha256(claim.encode()).digest()
    entry = _claims.get(job_id)
    if entry is None:
        used = _claimed.get(job_id)
        if used is not None and hmac.compare_digest(used[0], presented):
            spawner = used[1]()
            if spawner is not None:
                spawner.claim_conflict()
        return None
    digest, ref = entry
    if not hmac.compare_digest(digest, presented):
        return None
    del _claims[job_id]
    spawner = ref()
    if spawner is not None:
        _claimed[job_id] = entry
    return spawner


class ClaimHandler(APIHandler):
    """Trade a job's one-time claim for its server's token. No other credential:
    the claim is the credential, and it works once."""

    def check_xsrf_cookie(self) -> None:
        # No cookie is used or honoured here; the claim in the body authenticates.
        return None

    async def post(self) -> None:
        if len(self.request.body or b"") > MAX_BODY:
            raise web.HTTPError(413, "Claim too large.")
        body = self.get_json_body()
        job_id = body.get("job_id") if isinstance(body, dict) else None
        claim = body.get("claim") if isinstance(body, dict) else None
        if not isinstance(job_id, str) or not isinstance(claim, str) or not claim:
            raise web.HTTPError(400, "A claim is a JSON object with job_id and claim.")
        spawner = take_claim(job_id, claim)
        token = getattr(spawner, "api_token", None) if spawner is not None else None
        if not token:
            raise web.HTTPError(403, "This claim is unknown or was already used.")
        self.set_header("Cache-Control", "no-store")
        self.finish({"token": token})


class ReportHandler(APIHandler):
    """Accept ``{"job_id", "port", "gpus"}`` from the server a token belongs to."""

    @web.authenticated
    async def post(self) -> None:
        user: Any = self.current_user
        spawners = getattr(user, "spawners", None)
        token = self.get_auth_token() or ""
        if not spawners or not token:
            raise web.HTTPError(403, "Only a user server's own token can report.")
        if len(self.request.body or b"") > MAX_BODY:
            raise web.HTTPError(413, "Report too large.")
        spawner = None
        for candidate in list(spawners.values()):
            candidate_token = getattr(candidate, "api_token", None) or ""
            if candidate_token and hmac.compare_digest(candidate_token, token):
                spawner = candidate
                break
        accept = getattr(spawner, "accept_report", None)
        if spawner is None or accept is None:
            raise web.HTTPError(403, "This token does not belong to a Ray-placed server.")
        body = self.get_json_body()
        if not isinstance(body, dict):
            raise web.HTTPError(400, "The report must be a JSON object.")
        try:
            accept(body)
        except ValueError as exc:
            raise web.HTTPError(400, str(exc)) from None
        self.set_status(201)
        self.finish({"message": "reported"})


def register() -> None:
    """Add the handlers to the hub's API handlers once (idempotent)."""
    for path, handler in ((HANDLER_PATH, ReportHandler), (CLAIM_HANDLER_PATH, ClaimHandler)):
        if not any(entry[0] == path for entry in default_handlers):
            default_handlers.append((path, handler))
