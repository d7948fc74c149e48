"""The tests' clock reaches every module that reads the time.

The ``clock`` fixture replaces ``gpuportal.hub.timeutil.utcnow``. A module that
binds the function at import (``from ..timeutil import utcnow``, or
``default=timeutil.utcnow`` on a column) keeps the real one, and a test that moves
the clock silently tests nothing there. So every module calls
``timeutil.utcnow()`` at the moment it needs the time, and this test says where
one does not.
"""

from __future__ import annotations

import ast
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine

from gpuportal.hub import db as portal_db
from gpuportal.hub.db import accounts

from .fakes import Clock

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("hub", "spawners", "provider", "extensions")


def bindings_of_utcnow(source: str) -> list[int]:
    """Lines where ``source`` binds ``timeutil.utcnow`` instead of calling it."""
    tree = ast.parse(source)
    called = {
        id(node.func)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
    }
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("timeutil"):
            if any(alias.name == "utcnow" for alias in node.names):
                lines.append(node.lineno)
        elif (
            isinstance(node, ast.Attribute)
            and node.attr == "utcnow"
            and isinstance(node.value, ast.Name)
            and node.value.id == "timeutil"
            and id(node) not in called
        ):
            lines.append(node.lineno)
    return lines


def test_no_module_binds_utcnow_at_import() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{line}"
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        for line in bindings_of_utcnow(path.read_text())
    ]
    assert found == [], "call timeutil.utcnow() instead of binding it: " + ", ".join(found)


@pytest.mark.parametrize(
    "source",
    [
        "from ..timeutil import utcnow\n",
        "from gpuportal.hub.timeutil import as_utc, utcnow\n",
        "from .. import timeutil\nclock = timeutil.utcnow\n",
        "from .. import timeutil\ncolumn = Column(default=timeutil.utcnow)\n",
    ],
)
def test_the_check_finds_a_module_that_binds_utcnow(source: str) -> None:
    assert bindings_of_utcnow(source) != []


def test_the_check_passes_a_module_that_calls_utcnow() -> None:
    source = "from .. import timeutil\nfrom ..timeutil import as_utc\nnow = timeutil.utcnow()\n"
    assert bindings_of_utcnow(source) == []


def test_the_clock_sets_the_time_a_row_is_created(clock: Clock, db: Engine) -> None:
    """Column defaults read the clock too (``models.column_now``)."""
    clock.now = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    with portal_db.transaction(portal_db.session_factory(db)) as session:
        account = accounts.upsert_account(
            session, {"name": "ann", "admin": False, "groups": [], "kind": "user"}
        )
        session.flush()
        assert account.created_at == clock.now
