"""Signed requests from a provider node to the portal (ed25519).

A node proves who it is with the private key it created at join; the portal
knows only the public key. The signature covers a fixed text built from the
HTTP method, the API path, the node id, a Unix timestamp, a per-node counter
that only grows, and the SHA-256 of the body. So a captured request cannot be
altered (body), sent for another node (node id) or endpoint (path), replayed
(counter) or kept for later (timestamp).

Both sides import this module: the agent to sign, the portal to verify. It
depends on nothing of gpuportal.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SCHEME = b"gpuportal-node-v1"
NODE = "X-Gpuportal-Node"
TIMESTAMP = "X-Gpuportal-Timestamp"
COUNTER = "X-Gpuportal-Counter"
SIGNATURE = "X-Gpuportal-Signature"
HEADERS = (NODE, TIMESTAMP, COUNTER, SIGNATURE)
#: Counters are stored as signed 64-bit integers; timestamps are Unix seconds.
MAX_COUNTER = 2**63 - 1
MAX_TIMESTAMP = 2**40


class BadSignature(Exception):
    """The request is unsigned, malformed or its signature does not verify."""


def api_path(path: str) -> str:
    """The part of a URL path the signature covers: from ``/api/`` on.

    The agent and the portal see different prefixes (the proxy adds
    ``/services/portal``), so the common tail is what both sign.
    """
    at = path.find("/api/")
    return path[at:] if at >= 0 else path


def message(
    method: str, path: str, node_id: str, timestamp: int, counter: int, body: bytes
) -> bytes:
    return b"\n".join(
        [
            SCHEME,
            method.upper().encode(),
            api_path(path).encode(),
            node_id.encode(),
            str(timestamp).encode(),
            str(counter).encode(),
            hashlib.sha256(body).hexdigest().encode(),
        ]
    )


def public_key_hex(key: Ed25519PrivateKey) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def sign(
    key: Ed25519PrivateKey,
    method: str,
    path: str,
    node_id: str,
    timestamp: int,
    counter: int,
    body: bytes,
) -> dict[str, str]:
    """The headers that make this request a signed one."""
    signature = key.sign(message(method, path, node_id, timestamp, counter, body))
    return {
        NODE: node_id,
        TIMESTAMP: str(timestamp),
        COUNTER: str(counter),
        SIGNATURE: signature.hex(),
    }


def read_headers(headers: Mapping[str, str]) -> tuple[str, int, int, bytes]:
    """(node id, timestamp, counter, signature) or :class:`BadSignature`."""
    lowered = {k.lower(): v for k, v in headers.items()}
    values = [lowered.get(h.lower(), "") for h in HEADERS]
    if not all(values):
        raise BadSignature(
            "unsigned request: X-Gpuportal-Node, -Timestamp, -Counter and -Signature are required"
        )
    node_id, ts, counter, sig = values
    if len(node_id) > 64 or len(ts) > 32 or len(counter) > 32 or len(sig) > 256:
        raise BadSignature("the signature headers are too long")
    try:
        signature = bytes.fromhex(sig)
        timestamp, count = int(ts), int(counter)
    except ValueError:
        raise BadSignature("malformed signature headers") from None
    if not 0 < count <= MAX_COUNTER:
        raise BadSignature(f"the counter must be an integer from 1 to {MAX_COUNTER}")
    if not 0 < timestamp < MAX_TIMESTAMP:
        raise BadSignature("the timestamp must be Unix seconds")
    return node_id, timestamp, count, signature


def verify(
    public_key: str,
    method: str,
    path: str,
    node_id: str,
    timestamp: int,
    counter: int,
    body: bytes,
    signature: bytes,
) -> None:
    """Raise :class:`BadSignature` unless ``signature`` is the node's over this request."""
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key))
        key.verify(signature, message(method, path, node_id, timestamp, counter, body))
    except (InvalidSignature, ValueError):
        raise BadSignature("the signature does not verify") from None


def node_id_for(public_key: str) -> str:
    """A node's id, derived from its public key so two keys never share one."""
    return "n-" + hashlib.sha256(bytes.fromhex(public_key)).hexdigest()[:16]
