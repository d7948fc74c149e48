"""The shipped JupyterLab bundle: built from the sources in the tree, findable by
JupyterLab, and formatting money exactly as the portal does.

No Node.js here: the bundle is committed, and its build recorded a hash of the
sources it came from (``make labextension``), which these tests recompute.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gpuportal.extensions import _jupyter_labextension_paths, bundle
from gpuportal.provider.money import format_credits

CASES = bundle.SOURCE_DIR / "test" / "money-cases.json"


def test_the_shipped_bundle_was_built_from_these_sources() -> None:
    recorded = bundle.recorded_hash()
    assert recorded is not None, "no extensions/labextension/sources.sha256: run make labextension"
    assert recorded == bundle.source_hash(), (
        "extensions/labextension is older than extensions/lab: run `make labextension` "
        "and commit the result"
    )
    assert bundle.main(["bundle", "check"]) == 0


def test_a_changed_source_makes_the_check_fail(tmp_path: Path) -> None:
    """The check can fail: one changed byte in a copy of the sources changes the hash."""
    copy = tmp_path / "lab"
    for path in bundle.source_files():
        target = copy / path.relative_to(bundle.SOURCE_DIR)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    assert bundle.source_hash(copy) == bundle.source_hash()
    index = copy / "src" / "index.ts"
    index.write_text(index.read_text() + "\n// changed\n")
    assert bundle.source_hash(copy) != bundle.source_hash()
    # A new source file counts too.
    index.write_text((bundle.SOURCE_DIR / "src" / "index.ts").read_text())
    (copy / "src" / "extra.ts").write_text("export const x = 1;\n")
    assert bundle.source_hash(copy) != bundle.source_hash()


def test_the_bundle_is_a_prebuilt_jupyterlab_extension() -> None:
    meta = json.loads((bundle.BUNDLE_DIR / "package.json").read_text())
    assert meta["name"] == bundle.PACKAGE_NAME
    build = meta["jupyterlab"]["_build"]
    assert (bundle.BUNDLE_DIR / build["load"]).is_file()
    assert [p["dest"] for p in _jupyter_labextension_paths()] == [bundle.PACKAGE_NAME]


def test_jupyterlab_finds_the_extension_where_the_package_is_installed() -> None:
    """make install links the bundle where a wheel puts it (share/jupyter/labextensions)."""
    from jupyter_core.paths import jupyter_path

    found = [
        Path(p) / bundle.PACKAGE_NAME
        for p in jupyter_path("labextensions")
        if (Path(p) / bundle.PACKAGE_NAME / "package.json").is_file()
    ]
    assert found, "the bundle is not under any share/jupyter/labextensions: run make install"
    assert found[0].resolve() == bundle.BUNDLE_DIR.resolve()


def money_cases() -> list[tuple[int, str]]:
    return [(int(m), str(t)) for m, t in json.loads(CASES.read_text())["cases"]]


@pytest.mark.parametrize(("micro", "text"), money_cases())
def test_the_portal_formats_the_front_ends_money_cases_alike(micro: int, text: str) -> None:
    """The same table drives the front end's jest test (test/format.test.ts)."""
    assert format_credits(micro) == text


def test_the_wheel_ships_every_file_of_the_bundle_where_jupyterlab_looks() -> None:
    """pyproject's data-files put the whole bundle under share/jupyter/labextensions."""
    import tomllib

    root = bundle.HERE.parent
    config = tomllib.loads((root / "pyproject.toml").read_text())
    data_files = config["tool"]["setuptools"]["data-files"]
    prefix = f"share/jupyter/labextensions/{bundle.PACKAGE_NAME}"
    shipped = {
        (Path(dest) / path.name).as_posix()
        for dest, patterns in data_files.items()
        if dest.startswith(prefix)
        for pattern in patterns
        for path in root.glob(pattern)
    }
    wanted = {
        f"{prefix}/{path.relative_to(bundle.BUNDLE_DIR).as_posix()}"
        for path in bundle.BUNDLE_DIR.rglob("*")
        if path.is_file() and path.name != bundle.SOURCES_FILE.name
    }
    assert shipped == wanted
