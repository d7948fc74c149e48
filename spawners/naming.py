"""Ray job submission ids for user servers that can never collide.

KubeSpawner's pod-name collision (CVE-2020-15110: user ``a-b`` versus user ``a``
with server ``b``) came from joining escaped names with a character that the
escaping could also produce. Here the escaping only ever emits ``[a-z0-9_]``,
so the ``--`` separators are unambiguous and the mapping from
(user, server name) to the id prefix is injective. A random suffix makes every
spawn distinct, so a new server never meets the stopping job of the last one.
"""

from __future__ import annotations

import hashlib
import re
import secrets

PREFIX = "gpuportal"
_SAFE = re.compile(r"[a-z0-9]")
#: Escaped names longer than this are shortened and made unique with a hash,
#: keeping the id well inside file-name limits (Ray names log files after it).
MAX_ESCAPED = 80


def escape(name: str) -> str:
    """``[a-z0-9]`` stay as they are; every other character becomes ``_<hex>_``."""
    return "".join(c if _SAFE.fullmatch(c) else f"_{ord(c):x}_" for c in name)


def unescape(escaped: str) -> str:
    """The inverse of :func:`escape` (used by tests to prove it is injective)."""
    out: list[str] = []
    i = 0
    while i < len(escaped):
        if escaped[i] == "_":
            end = escaped.index("_", i + 1)
            out.append(chr(int(escaped[i + 1 : end], 16)))
            i = end + 1
        else:
            out.append(escaped[i])
            i += 1
    return "".join(out)


def server_key(user: str, server: str) -> str:
    """A stable, collision-free, Ray-safe key for one (user, server name) pair."""
    key = f"{escape(user)}--{escape(server)}"
    if len(key) <= MAX_ESCAPED:
        return key
    # Long keys are exactly one character longer than any short key can be,
    # so a shortened key never equals a plain one; the hash separates the rest.
    digest = hashlib.sha256(f"{user}\0{server}".encode()).hexdigest()[:16]
    return f"{key[: MAX_ESCAPED - 16]}-{digest}"


def job_submission_id(user: str, server: str) -> str:
    """``gpuportal--<user>--<server>--<random>``: one fresh id per spawn."""
    return f"{PREFIX}--{server_key(user, server)}--{secrets.token_hex(4)}"


def oauth_client_id(user: str, server: str) -> str:
    """The server's OAuth client id (also its cookie name), collision-free.

    JupyterHub's own ``jupyterhub-user-<user>[-<server>]`` gives user ``a-b`` and
    user ``a``'s server ``b`` the same client, and the second spawn fails.
    """
    return f"jupyterhub-user-{server_key(user, server)}"
