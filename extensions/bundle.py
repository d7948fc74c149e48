"""The JupyterLab front end's prebuilt bundle, and the fingerprint of its sources.

The TypeScript sources live in ``extensions/lab/``; ``make labextension`` builds
them (Node.js needed) into ``extensions/labextension/``, which the package ships,
so installing gpuportal needs no Node.js. The build records here a SHA-256 of the
sources it was built from (``SOURCES_FILE``); a test recomputes it, so a change to
the sources without a rebuild fails the suite. Git keeps no mtimes, hence a hash.

``python -m gpuportal.extensions.bundle record`` writes the fingerprint (the
Makefile runs it after each build); ``check`` exits 1 when the bundle is stale.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

HERE = Path(__file__).parent
#: The TypeScript package, and where its build lands (``jupyterlab.outputDir``).
SOURCE_DIR = HERE / "lab"
BUNDLE_DIR = HERE / "labextension"
#: The npm name: the folder under share/jupyter/labextensions/.
PACKAGE_NAME = "@gpuportal/jupyterlab"
SOURCES_FILE = BUNDLE_DIR / "sources.sha256"

#: What the bundle is built from: the code, the styles and the exact dependencies.
#: The unit tests (test/, jest.config.js) do not change the bundle.
SOURCE_GLOBS = ("src/**/*.ts", "style/**/*", "package.json", "package-lock.json", "tsconfig.json")


def source_files(root: Path = SOURCE_DIR) -> list[Path]:
    found = {p for pattern in SOURCE_GLOBS for p in root.glob(pattern) if p.is_file()}
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def source_hash(root: Path = SOURCE_DIR) -> str:
    """SHA-256 over each source file's relative path and bytes, in path order."""
    digest = hashlib.sha256()
    for path in source_files(root):
        name = path.relative_to(root).as_posix().encode()
        data = path.read_bytes()
        digest.update(len(name).to_bytes(4, "big") + name)
        digest.update(len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()


def recorded_hash(bundle: Path = BUNDLE_DIR) -> str | None:
    path = bundle / SOURCES_FILE.name
    return path.read_text().split()[0] if path.is_file() else None


def main(argv: list[str]) -> int:
    command = argv[1] if len(argv) > 1 else "check"
    if command == "record":
        SOURCES_FILE.write_text(f"{source_hash()}  extensions/lab sources\n")
        return 0
    if command == "check":
        if recorded_hash() != source_hash():
            print(
                "The shipped JupyterLab bundle (extensions/labextension) was not built from "
                "the sources in extensions/lab: run `make labextension` and commit the result.",
                file=sys.stderr,
            )
            return 1
        return 0
    print("usage: python -m gpuportal.extensions.bundle record|check", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
