"""Signed, once-only requests from the hub's spawner to a node's warm pool.

A warm pool (``provider/warmpool.py``) holds server processes that have paid for
their imports but hold nothing of a user. Only the hub's spawner may claim one,
hand it a user's token, or stop one, so every request to the pool is signed:

- the key is per pool: ``pool_key(secret, pool_id)``, an HMAC of the hub's claim
  secret and the pool's Ray job id. The pool's job gets only its own key, so
  whoever reads one cluster's jobs can forge requests to that pool alone (and the
  provider who runs that pool holds its servers anyway);
- the body is JSON with the pool id, an operation, a random ``claim_id`` and an
  expiry (``exp``, Unix seconds, at most :data:`MAX_TTL` ahead); the signature
  is ``HMAC-SHA256(key, body)`` in hex, in the :data:`SIGNATURE_HEADER` header;
- the pool refuses a wrong signature, another pool's request, an expired or
  too-far-dated one, and a ``claim_id`` it has seen before (:class:`ReplayGuard`),
  so a request read off the wire cannot be played again.

Pure standard library: node-side code imports it, and it never imports
``gpuportal.hub``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
import time
from typing import Any

SIGNATURE_HEADER = "X-Gpuportal-Signature"
#: The longest a signed request stays valid, seconds (clocks of hub and node may differ a little).
MAX_TTL = 60
#: Requests the pool answers.
OPERATIONS = frozenset({"claim", "stop", "status"})
#: The largest signed body a pool reads, bytes (env, args and a token fit easily).
MAX_BODY = 65536


class ClaimRefused(Exception):
    """A request the pool must not act on; the message says why (no secret in it)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def pool_key(secret: str, pool_id: str) -> str:
    """The key of one pool: nothing else can be derived from it."""
    return hmac.new(secret.encode(), f"warmpool:{pool_id}".encode(), hashlib.sha256).hexdigest()


def sign(key: str, body: bytes) -> str:
    return hmac.new(key.encode(), body, hashlib.sha256).hexdigest()


def make_request(
    key: str, pool_id: str, op: str, fields: dict[str, Any] | None = None, ttl: int = 30
) -> tuple[bytes, dict[str, str]]:
    """A signed request body and its headers, valid for ``ttl`` seconds, usable once."""
    if op not in OPERATIONS:
        raise ValueError(f"unknown operation {op!r}")
    payload = {
        **(fields or {}),
        "pool": pool_id,
        "op": op,
        "claim_id": secrets.token_urlsafe(16),
        "exp": int(time.time()) + max(1, min(ttl, MAX_TTL)),
    }
    body = json.dumps(payload, separators=(",", ":")).encode()
    return body, {SIGNATURE_HEADER: sign(key, body), "Content-Type": "application/json"}


class ReplayGuard:
    """The claim ids seen until their expiry: each signed request acts once."""

    def __init__(self) -> None:
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()

    def first_time(self, claim_id: str, exp: int, now: float) -> bool:
        with self._lock:
            for old in [c for c, e in self._seen.items() if e < now]:
                del self._seen[old]
            if claim_id in self._seen:
                return False
            self._seen[claim_id] = exp
            return True


def verify(
    key: str,
    pool_id: str,
    body: bytes,
    signature: str,
    guard: ReplayGuard,
    now: float | None = None,
) -> dict[str, Any]:
    """The request's fields when ``body`` is a fresh request for this pool signed
    with ``key``; :class:`ClaimRefused` otherwise (401 unsigned or forged, 400
    malformed, 403 another pool's or expired, 409 replayed)."""
    if len(body) > MAX_BODY:
        raise ClaimRefused(413, "The request is too large.")
    if not signature or not hmac.compare_digest(sign(key, body), signature.strip().lower()):
        raise ClaimRefused(401, "The request is not signed by the hub.")
    try:
        payload = json.loads(body)
    except ValueError:
        raise ClaimRefused(400, "The request is not JSON.") from None
    if not isinstance(payload, dict):
        raise ClaimRefused(400, "The request is not a JSON object.")
    claim_id, exp, op = payload.get("claim_id"), payload.get("exp"), payload.get("op")
    if not isinstance(claim_id, str) or not 8 <= len(claim_id) <= 128:
        raise ClaimRefused(400, "The request has no claim id.")
    if not isinstance(exp, int) or isinstance(exp, bool) or op not in OPERATIONS:
        raise ClaimRefused(400, "The request has no expiry or operation.")
    if payload.get("pool") != pool_id:
        raise ClaimRefused(403, "The request is for another pool.")
    now = time.time() if now is None else now
    if exp < now or exp > now + MAX_TTL + 5:
        raise ClaimRefused(403, "The request has expired.")
    if not guard.first_time(claim_id, exp, now):
        raise ClaimRefused(409, "The request was already used.")
    return payload
