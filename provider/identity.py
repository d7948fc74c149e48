"""The node identity: an ed25519 keypair and the node's settings, in the config dir.

The private key never leaves the provider's machine. It is written 0600 (and
its directory 0700) and refused if anyone else can read it. The heartbeat
counter is taken from the clock in milliseconds and never goes backwards in a
process, so it keeps growing across agent restarts too.
"""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from .signing import node_id_for, public_key_hex, sign

KEY_FILE = "node.key"
STATE_FILE = "node.json"


class IdentityError(Exception):
    """The identity files are missing, unsafe or broken; the message says which."""


def default_config_dir() -> Path:
    """``$GPUPORTAL_PROVIDER_DIR``, else ``$XDG_CONFIG_HOME/gpuportal-provider``."""
    env = os.environ.get("GPUPORTAL_PROVIDER_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "gpuportal-provider"


@dataclass
class NodeState:
    """What the agent remembers between runs (no secrets: the hub token is not kept)."""

    node_id: str
    hub_url: str = ""
    region: str = ""
    price: int = 0
    demo: bool = False
    demo_gpus: str = ""
    ray_address: str = ""
    jobs_url: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class Identity:
    """A node's key, id and remembered state, and the signing of its requests."""

    def __init__(self, config_dir: Path, key: Ed25519PrivateKey, state: NodeState) -> None:
        self.config_dir = config_dir
        self.key = key
        self.state = state
        self._counter = 0
        self._lock = threading.Lock()

    @property
    def node_id(self) -> str:
        return self.state.node_id

    @property
    def public_key(self) -> str:
        return public_key_hex(self.key)

    @classmethod
    def create_or_load(cls, config_dir: Path) -> Identity:
        """Load the identity, or create a new key (0600) when there is none."""
        key_path = config_dir / KEY_FILE
        if key_path.exists():
            return cls.load(config_dir)
        config_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(config_dir, 0o700)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
        identity = cls(config_dir, key, NodeState(node_id=node_id_for(public_key_hex(key))))
        identity.save()
        return identity

    @classmethod
    def load(cls, config_dir: Path) -> Identity:
        key_path = config_dir / KEY_FILE
        try:
            mode = key_path.stat().st_mode
        except OSError:
            raise IdentityError(
                f"no node identity in {config_dir}; run `gpuportal provider join` first."
            ) from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise IdentityError(f"{key_path} is readable by others; run `chmod 600 {key_path}`.")
        try:
            key = load_pem_private_key(key_path.read_bytes(), password=None)
        except ValueError:
            raise IdentityError(f"{key_path} is not an ed25519 private key.") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(f"{key_path} is not an ed25519 private key.")
        try:
            raw = json.loads((config_dir / STATE_FILE).read_text())
            state = NodeState(**raw)
        except (OSError, ValueError, TypeError):
            state = NodeState(node_id=node_id_for(public_key_hex(key)))
        return cls(config_dir, key, state)

    def save(self) -> None:
        path = self.config_dir / STATE_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(asdict(self.state), handle, indent=2)

    def next_counter(self) -> int:
        """Strictly increasing: milliseconds since the epoch, or the last value plus one."""
        with self._lock:
            self._counter = max(self._counter + 1, time.time_ns() // 1_000_000)
            return self._counter

    def sign(self, method: str, path: str, body: bytes) -> dict[str, str]:
        return sign(
            self.key, method, path, self.node_id, int(time.time()), self.next_counter(), body
        )
