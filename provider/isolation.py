"""How a node keeps customers apart: one OS account per customer, and a sandbox.

Node-side code (the ``gpuportal-singleuser`` wrapper and the provider agent use
it); it never imports ``gpuportal.hub``.

The model, strongest first:

- ``user``: the node runs as root, so each customer's server runs as that
  customer's own unprivileged system user (created on first use, as The
  Littlest JupyterHub does), with a home of its own, mode 0700. Where
  bubblewrap (``bwrap``) is installed the server also runs in a sandbox: its own
  PID namespace (no other process is visible) and a filesystem view holding
  only the customer's home, a private ``/tmp`` and read-only system paths.
- ``exclusive``: the node lacks the privileges to create users, so it hosts one
  customer at a time (the marketplace places nothing else on it while one
  customer holds it). The server still runs in the sandbox, which is required
  here: without it the server would run as the control plane's OS user.

A node that has neither root nor bubblewrap cannot keep customer code away from
the account that runs Ray, and refuses to start servers (:class:`IsolationError`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import pwd
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ISOLATION_USER = "user"
ISOLATION_EXCLUSIVE = "exclusive"
#: Environment variable (set by the node on its Ray processes) naming where homes live.
ENV_HOMES = "GPUPORTAL_NODE_HOMES"
_SAFE = re.compile(r"[^a-z0-9]+")
#: Packages of gpuportal a user server imports (the server extension and its NVML
#: seam). The control plane (``gpuportal.hub``) is not among them.
SERVER_PACKAGES = ("gpuportal.extensions", "gpuportal.provider", "gpuportal.notebooks")


class IsolationError(RuntimeError):
    """This node cannot start a customer's server in isolation; the message says why."""


@dataclass(frozen=True)
class Account:
    """The OS account a customer's server runs as on this node."""

    name: str
    uid: int
    gid: int
    home: Path


def node_isolation() -> str:
    """``user`` when this process may create accounts (root), else ``exclusive``."""
    return ISOLATION_USER if os.geteuid() == 0 else ISOLATION_EXCLUSIVE


def bwrap_path() -> str | None:
    return shutil.which("bwrap")


def os_user_name(hub_user: str) -> str:
    """A system account name for a hub user: ``gp-<readable>-<hash>``.

    Lower-case letters, digits and dashes, at most 32 characters, and distinct
    for distinct hub names (``a-b`` and ``a.b`` differ by their hash).
    """
    readable = _SAFE.sub("-", hub_user.lower()).strip("-")[:16] or "user"
    digest = hashlib.sha256(hub_user.encode()).hexdigest()[:10]
    return f"gp-{readable}-{digest}"


def default_homes() -> Path:
    return Path(os.environ.get(ENV_HOMES) or "/var/lib/gpuportal/homes")


def _prepare_root(homes: Path) -> None:
    # Root-owned and 0711: an account reaches its own home, but nobody lists the others.
    homes.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(homes, 0, 0)
    os.chmod(homes, 0o711)  # noqa: S103 (traverse only, no listing)


def prepare_homes(homes: Path) -> None:
    """The homes folder, made if needed: root's, 0711 (each home reachable, none listed)."""
    _prepare_root(homes)


def ensure_account(hub_user: str, homes: Path) -> Account:
    """The customer's own unprivileged account and 0700 home, made on first use (root only)."""
    if os.geteuid() != 0:
        raise IsolationError("creating a customer's account needs root")
    name = os_user_name(hub_user)
    home = homes / name
    _prepare_root(homes)
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        done = subprocess.run(
            [
                useradd,
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                str(home),
                "--shell",
                "/bin/bash",
                "--comment",
                "gpuportal customer",
                name,
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        try:  # two spawns of one customer may race to create it: either wins
            entry = pwd.getpwnam(name)
        except KeyError:
            raise IsolationError(
                f"could not create the account {name}: {done.stderr.strip()[:200]}"
            ) from None
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise IsolationError(f"the account {name} is privileged; refusing to use it")
    home.mkdir(mode=0o700, exist_ok=True)
    os.chown(home, entry.pw_uid, entry.pw_gid)
    os.chmod(home, 0o700)
    return Account(name, entry.pw_uid, entry.pw_gid, home)


def current_account(hub_user: str, homes: Path) -> Account:
    """Exclusive mode: the node's own (unprivileged) account, a home per customer."""
    _prepare_root(homes)
    home = homes / os_user_name(hub_user)
    home.mkdir(mode=0o700, exist_ok=True)
    os.chmod(home, 0o700)
    entry = pwd.getpwuid(os.getuid())
    return Account(entry.pw_name, entry.pw_uid, entry.pw_gid, home)


def _package_dirs() -> list[Path]:
    """Folders of the gpuportal packages a server imports (an editable install
    maps them outside site-packages)."""
    dirs: list[Path] = []
    for name in SERVER_PACKAGES:
        with contextlib.suppress(ImportError, ValueError):
            spec = importlib.util.find_spec(name)
            if spec and spec.submodule_search_locations:
                # An editable install lists a path-hook placeholder too: real folders only.
                dirs += [Path(p) for p in spec.submodule_search_locations if Path(p).is_dir()]
    return dirs


def drop_privileges(argv: list[str], account: Account) -> list[str]:
    """``argv`` run as ``account`` by ``setpriv``: its uid and gid only (no
    supplementary group), no capability left in any set, and no way to gain one
    (no_new_privs)."""
    setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
    return [
        setpriv,
        f"--reuid={account.uid}",
        f"--regid={account.gid}",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
        "--",
        *argv,
    ]


def sandbox_command(
    argv: list[str],
    home: Path | None,
    bwrap: str,
    account: Account | None = None,
    hidden_homes: tuple[Path, Path] | None = None,
) -> list[str]:
    """``argv`` inside bubblewrap: its own PID, IPC and UTS namespaces, and a view of
    the filesystem with read-only system paths and Python, the home read-write, a
    private ``/tmp`` and ``/dev`` (plus NVIDIA's device nodes), and nothing else:
    no data dir, no Ray session files, no other home.

    ``account``: bubblewrap runs as root (it can then mount a Python that lives
    where the customer could not reach it, such as root's home) and the command
    inside drops to the customer's account before anything of theirs runs.

    ``home`` None with ``hidden_homes`` ``(homes, at)``: a warm slot's sandbox,
    made before its customer is known (``provider/warmslot.py``). The homes
    folder is bound at ``at``, and ``homes`` is an empty folder; at its claim the
    slot binds its customer's home into place and unmounts ``at`` before it
    drops to the customer, so the view ends up the same as a cold start's.
    """
    if account is not None:
        argv = drop_privileges(argv, account)
    cmd = [
        bwrap,
        "--die-with-parent",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--hostname",
        "gpuportal",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--tmpfs",
        "/tmp",  # noqa: S108 (a private tmpfs inside the sandbox)
        "--ro-bind",
        "/usr",
        "/usr",
        "--ro-bind",
        "/etc",
        "/etc",
        "--ro-bind-try",
        "/sys",
        "/sys",
    ]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/opt"):
        path = Path(top)
        if path.is_symlink():
            cmd += ["--symlink", os.readlink(path), top]
        elif path.is_dir():
            cmd += ["--ro-bind", top, top]
    # Python and the packages are bound unless a system mount already shows them. Not
    # /tmp: the sandbox's /tmp is a new, empty tmpfs, so a Python that lives under the
    # host's /tmp (a CI checkout, say) is bound into it like any other.
    mounted: set[str] = {"/usr", "/etc", "/opt", "/sys", "/proc", "/dev"}
    binds: list[tuple[str, str, str]] = []
    for path in [Path(sys.prefix), Path(sys.base_prefix), *_package_dirs()]:
        resolved = str(path.resolve())
        if _under(resolved, mounted):
            continue
        mounted.add(resolved)
        binds.append(("--ro-bind", resolved, resolved))
        if str(path) != resolved:  # a venv reached through a symlink
            binds.append(("--ro-bind", resolved, str(path)))
    if home is not None:
        binds.append(("--bind", str(home), str(home)))
    made: list[str] = []
    if hidden_homes is not None:
        homes, at = hidden_homes
        binds.append(("--bind", str(homes), str(at)))
        made.append(str(homes))
    # The folders above each mount are made 0755 in the sandbox, so the customer can
    # reach a Python that lives under a folder closed to them outside (root's home).
    system = {"/usr", "/etc", "/opt", "/sys", "/proc", "/dev"}
    dests = {dest for _, _, dest in binds} | set(made)
    parents = sorted(
        {
            str(p)
            for dest in dests
            for p in Path(dest).parents
            if str(p) not in ("/", "/tmp")  # noqa: S108
            and str(p) not in dests
            and not _under(str(p), system)
        },
        key=lambda p: p.count("/"),
    )
    for parent in parents:
        cmd += ["--perms", "0755", "--dir", parent]
    for made_dir in made:
        cmd += ["--perms", "0755", "--dir", made_dir]
    for kind, source, dest in binds:
        cmd += [kind, source, dest]
    for dev in sorted(Path("/dev").glob("nvidia*")):
        cmd += ["--dev-bind", str(dev), str(dev)]
    if Path("/proc/driver/nvidia").exists():
        cmd += ["--ro-bind", "/proc/driver/nvidia", "/proc/driver/nvidia"]
    cmd += ["--chdir", str(home or "/"), "--", *argv]
    return cmd


def _under(path: str, roots: set[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def sandbox_works(bwrap: str, account: Account) -> bool:
    """Can a bubblewrap sandbox start here and run a command as ``account``?"""
    as_root = os.geteuid() == 0
    probe = ["true"]
    if as_root:
        probe = drop_privileges(probe, account)
    try:
        done = subprocess.run(
            [bwrap, "--ro-bind", "/", "/", "--unshare-pid", "--proc", "/proc", *probe],
            capture_output=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0
