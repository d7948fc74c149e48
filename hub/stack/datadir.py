"""The data dir holds the control plane's secrets: it is 0700 and its files 0600.

SQLite databases, the cookie secret, the spawner's and Ray's tokens, the
passwords and the logs all live there. Whatever the umask of the shell that ran
``make run``, nothing in it is readable by another OS account, and customers'
servers run under accounts of their own (``provider/isolation.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

PRIVATE_UMASK = 0o077


def secure_data_dir(data_dir: Path) -> None:
    """Create ``data_dir`` if needed and make it, and all in it, private to this account.

    Also sets this process's umask to 0077, so what it and its children create
    later (the databases, logs, pid files) is private from the start.
    """
    os.umask(PRIVATE_UMASK)
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    for root, dirs, files in os.walk(data_dir):
        for name in dirs:
            path = Path(root) / name
            if not path.is_symlink():
                os.chmod(path, 0o700)
        for name in files:
            path = Path(root) / name
            if not path.is_symlink():
                os.chmod(path, 0o600)
