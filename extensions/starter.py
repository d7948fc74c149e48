"""The starter workspace: the team's notebook templates in a new server's home.

When a server starts, every notebook of the template folder (``notebooks/``,
shipped as ``gpuportal.notebooks``) that the user has not had yet is copied
into their home, so the file browser shows it at once, as TLJH and nbgitpuller
users expect. What the user did with a copy is theirs:

* a file the user changed is never overwritten;
* a file the user deleted is not brought back;
* a copy the user left untouched follows a newer template.

A small manifest in the home (``.gpuportal/starter.json``: path → SHA-256 of
the copy made) tells these apart. Node-side code: runs as the customer, in the
server's process, and writes nothing outside the home.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST = Path(".gpuportal") / "starter.json"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _templates(source: Path) -> dict[str, Path]:
    return {
        str(p.relative_to(source)): p
        for p in sorted(source.rglob("*.ipynb"))
        if ".ipynb_checkpoints" not in p.parts
    }


def _read_manifest(home: Path) -> dict[str, str]:
    try:
        data = json.loads((home / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (a reader never sees half a notebook)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.gpuportal-tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def install(home: Path, source: Path) -> list[str]:
    """Copy the starter notebooks of ``source`` into ``home``; returns what was written."""
    if not source.is_dir():
        return []
    manifest = _read_manifest(home)
    written: list[str] = []
    for rel, template in _templates(source).items():
        dest = home / rel
        if dest.is_symlink():
            continue  # never write through a link the user made
        wanted = _digest(template)
        if dest.exists():
            if manifest.get(rel) != _digest(dest) or manifest.get(rel) == wanted:
                continue  # changed by the user, or already the latest copy
        elif rel in manifest:
            continue  # the user deleted it
        _write(dest, template.read_bytes())
        manifest[rel] = wanted
        written.append(rel)
    if written:
        _write(home / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
        log.info("gpuportal: starter notebooks copied into the home: %s", ", ".join(written))
    return written


def default_source() -> Path:
    """The folder of the notebook templates shipped with gpuportal."""
    import gpuportal.notebooks

    return Path(next(iter(gpuportal.notebooks.__path__)))
