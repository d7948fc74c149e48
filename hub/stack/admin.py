"""The hub admin of the embedded deployment: created on first start.

FirstUseAuthenticator keeps bcrypt hashes in a dbm file; gpuportal writes the
admin's entry there before the hub starts, so the admin can log in at once.
The password is ``GPUPORTAL_ADMIN_PASSWORD`` when set; otherwise one is
generated, written 0600 to the data dir and printed once.
"""

from __future__ import annotations

import dbm
import os
import secrets
from pathlib import Path

import bcrypt

from ..errors import ConfigError

PASSWORD_FILE = "admin-password"  # noqa: S105 (a file name)


def passwords_dbm(data_dir: Path) -> Path:
    """Base path of FirstUseAuthenticator's password store (dbm adds suffixes)."""
    return data_dir / "passwords.dbm"


def set_password(data_dir: Path, username: str, password: str, min_length: int = 8) -> None:
    if not username or "," in username or " " in username:
        raise ConfigError(f"{username!r} is not a valid hub user name (no spaces or commas).")
    if len(password) < min_length:
        raise ConfigError(f"the password must have at least {min_length} characters.")
    data_dir.mkdir(parents=True, exist_ok=True)
    with dbm.open(str(passwords_dbm(data_dir)), "c", 0o600) as store:
        store[username.encode()] = bcrypt.hashpw(password.encode(), bcrypt.gensalt())


def check_password(data_dir: Path, username: str, password: str) -> bool:
    try:
        with dbm.open(str(passwords_dbm(data_dir)), "r") as store:
            stored = store.get(username.encode())
    except dbm.error:
        return False
    return stored is not None and bcrypt.checkpw(password.encode(), stored)


def has_password(data_dir: Path, username: str) -> bool:
    try:
        with dbm.open(str(passwords_dbm(data_dir)), "r") as store:
            return username.encode() in store
    except dbm.error:
        return False


def ensure_admin(
    data_dir: Path, username: str, password: str | None, min_length: int = 8
) -> str | None:
    """Make sure the admin can log in. Returns a newly generated password, else None.

    A password given in the environment always wins (so an operator can reset
    it). Without one, an existing password is kept; a missing one is generated.
    """
    if password:
        if not check_password(data_dir, username, password):
            set_password(data_dir, username, password, min_length)
        return None
    if has_password(data_dir, username):
        return None
    generated = secrets.token_urlsafe(12)
    set_password(data_dir, username, generated, min_length)
    path = data_dir / PASSWORD_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(f"{username}:{generated}\n")
    return generated


ADMINS_FILE = "admin-users"


def extra_admins(data_dir: Path) -> set[str]:
    """Admins added with ``gpuportal admin create`` (one name a line)."""
    try:
        lines = (data_dir / ADMINS_FILE).read_text().splitlines()
    except OSError:
        return set()
    return {line.strip() for line in lines if line.strip()}


def add_admin(data_dir: Path, username: str) -> None:
    names = extra_admins(data_dir) | {username}
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / ADMINS_FILE).write_text("".join(f"{n}\n" for n in sorted(names)))
