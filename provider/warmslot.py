"""One warm slot: a process that has paid for every import of a user server and
holds nothing of a user until its pool hands it a claim.

The pool (``provider/warmpool.py``) starts it from a clean environment (no
``JUPYTERHUB_*`` variable, no token, no pool key, no Ray variable), at low CPU
priority so that waiting slots never slow a running server. It imports
``jupyterhub.singleuser``, jupyter_server, JupyterLab and the gpuportal server
extension, says ``ready`` on stdout and blocks on one line of stdin.

That line is the claim: the user, the server's environment and token, its
``CUDA_VISIBLE_DEVICES`` (the marketplace's reserved GPU indices) and its
arguments. The slot then becomes the server exactly as a cold start does
(``spawners/singleuser.py``): the customer's own OS account (made on first use),
the same allow-listed environment, ``CUDA_VISIBLE_DEVICES`` set before anything
can initialise CUDA (kernels are new processes that inherit it), home as the
working directory, umask 0077. Privileges are dropped for good (no supplementary
group, uid and gid of the customer) before it answers the pool with its port and
starts serving in this same process.

Where the node sandboxes servers (root with bubblewrap), the pool starts each
slot in the same sandbox a cold server gets, made before its customer is known:
the homes folder is bound at a hidden place, and at the claim the slot binds its
customer's home into place, unmounts the rest, and drops to the customer with
what ``setpriv`` does for a cold start (no supplementary group, no capability,
no_new_privs). The account itself is made by the pool, outside the sandbox.
A node that is not root runs no warm slots (its servers start cold).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import importlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from gpuportal.provider import isolation
from gpuportal.provider.ports import free_port

#: Set by the pool on a slot it starts in a sandbox: where the homes folder is bound
#: until the claim (``isolation.sandbox_command``'s ``hidden_homes``).
ENV_HIDDEN_HOMES = "GPUPORTAL_WARM_HIDDEN_HOMES"
#: Set by the pool on a slot started for a claim that is already waiting: it imports
#: at normal priority.
ENV_URGENT = "GPUPORTAL_WARM_URGENT"
_MS_BIND, _MS_REC, _MNT_DETACH = 4096, 16384, 2
_PR_SET_NO_NEW_PRIVS, _PR_CAPBSET_DROP = 38, 24
#: Nice value of a waiting slot: replacing a claimed slot never competes with servers.
WAITING_NICE = 10


def _imports() -> None:
    # Everything a user server imports at start-up, paid for before any claim.
    import jupyter_server.serverapp  # noqa: F401
    import jupyterhub.singleuser  # noqa: F401
    import jupyterlab.labapp  # noqa: F401

    import gpuportal.extensions  # noqa: F401

    # And every server extension the environment enables (a server imports each at start).
    with contextlib.suppress(Exception):
        from jupyter_core.paths import jupyter_config_path
        from jupyter_server.extension.config import ExtensionConfigManager

        manager = ExtensionConfigManager(read_config_path=jupyter_config_path())
        for name, enabled in manager.get_jpserver_extensions().items():
            if enabled:
                with contextlib.suppress(Exception):
                    importlib.import_module(name)


def _answer(out: Any, message: dict[str, Any]) -> None:
    out.write(json.dumps(message) + "\n")
    out.flush()


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _mount_home(hidden: Path, home: Path) -> None:
    """In the slot's sandbox: bind the customer's home into place from the homes
    folder bound at ``hidden``, then detach ``hidden``: only this home remains."""
    libc = _libc()
    home.mkdir(mode=0o700, exist_ok=True)
    source = hidden / home.name
    if libc.mount(str(source).encode(), str(home).encode(), None, _MS_BIND | _MS_REC, None) != 0:
        raise OSError(ctypes.get_errno(), f"could not mount the home {home}")
    if libc.umount2(str(hidden).encode(), _MNT_DETACH) != 0:
        raise OSError(ctypes.get_errno(), "could not unmount the homes folder")


def _drop_to(account: isolation.Account) -> None:
    """As ``setpriv`` does for a cold start: uid and gid only, no supplementary group,
    no capability in any set (the bounding set emptied, none inheritable), and no way
    to gain one (no_new_privs)."""
    libc = _libc()
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "could not set no_new_privs")
    for cap in range(64):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() != errno.EINVAL:
            raise OSError(ctypes.get_errno(), "could not empty the bounding set")
    os.setgroups([])
    os.setgid(account.gid)
    os.setuid(account.uid)  # clears the permitted and effective sets
    if os.getuid() == 0 or os.geteuid() == 0 or os.getgid() == 0:
        raise isolation.IsolationError("could not drop privileges")


def become(claim: dict[str, Any]) -> tuple[dict[str, str], int]:
    """Take on the claim's user: their account (made by the pool), home, environment
    and GPUs, privileges dropped for good. Returns the environment and the port."""
    from gpuportal.provider.serverenv import die_with_parent, server_env

    env_in, token, acct = claim.get("env"), claim.get("token"), claim.get("account")
    if not isinstance(env_in, dict) or not isinstance(acct, dict):
        raise ValueError("the claim names no user")
    if not isinstance(token, str) or not token:
        raise ValueError("the claim holds no token")
    account = isolation.Account(
        str(acct["name"]), int(acct["uid"]), int(acct["gid"]), Path(str(acct["home"]))
    )
    if account.uid == 0 or account.gid == 0 or os.geteuid() != 0:
        raise isolation.IsolationError("a warm slot runs only as root, for an unprivileged account")
    hidden = os.environ.get(ENV_HIDDEN_HOMES)
    if hidden:
        _mount_home(Path(hidden), account.home)
    ip = str(env_in.get("GPUPORTAL_SINGLEUSER_IP") or "127.0.0.1")
    port = free_port(ip)
    prefix = str(env_in.get("JUPYTERHUB_SERVICE_PREFIX") or "/")
    host = f"[{ip}]" if ":" in ip else ip
    source = {str(k): str(v) for k, v in env_in.items()}
    source["CUDA_VISIBLE_DEVICES"] = str(claim.get("gpus") or "")
    env = server_env(source, token, account, f"http://{host}:{port}{prefix}")
    os.setpriority(os.PRIO_PROCESS, 0, 0)  # back to normal priority (needs root)
    os.chdir(account.home)
    _drop_to(account)
    # A change of credentials clears the parent-death signal: ask again.
    die_with_parent(signal.SIGKILL)
    os.umask(0o077)
    os.environ.clear()
    os.environ.update(env)
    return env, port


def main() -> int:
    out = sys.stdout
    if not os.environ.get(ENV_URGENT):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, WAITING_NICE)
    _imports()
    _answer(out, {"ready": True, "pid": os.getpid()})
    line = sys.stdin.readline(1 << 16)
    if not line:
        return 0  # the pool went away before a claim
    try:
        claim = json.loads(line)
        if not isinstance(claim, dict):
            raise ValueError("the claim is not an object")
        args = [str(a) for a in claim.get("args") or []]
        _env, port = become(claim)
    except (ValueError, OSError, isolation.IsolationError) as exc:
        _answer(out, {"error": str(exc)[:300]})
        return 5
    _answer(out, {"port": port, "uid": os.getuid()})
    # From here on the server's output goes where the pool's does (the job's log).
    os.dup2(2, 1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)  # the pool's pipe is done with; the server reads nothing
    os.close(null)
    import jupyterhub.singleuser

    # Bind address and port come from JUPYTERHUB_SERVICE_URL, as in a cold start.
    sys.argv = ["jupyterhub-singleuser", *args]
    result = jupyterhub.singleuser.main()
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
