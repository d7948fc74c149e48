"""``gpuportal credits grant``: exact amounts, idempotent with --key, one line on bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from gpuportal.hub import db as portal_db
from gpuportal.hub.settings import load_settings
from gpuportal.hub.stack.cli import main

from .conftest import add_account, balance_of


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GPUPORTAL_DATA_DIR", str(tmp_path))
    engine = portal_db.make_engine(load_settings(data_dir=tmp_path).database_url)
    portal_db.upgrade(engine)
    add_account(portal_db.session_factory(engine), "ann")
    engine.dispose()
    return tmp_path


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["credits", "grant", *args])
    return result.exit_code, result.output


def test_grant_from_the_command_line(data_dir: Path) -> None:
    assert run("ann", "2.5", "--key", "k1") == (
        0,
        "granted: 2.50 credits to ann (transaction 1); balance 2.50 credits\n",
    )
    code, out = run("ann", "2.5", "--key", "k1")
    assert (code, out.startswith("already granted (same key), nothing added")) == (0, True)
    engine = portal_db.make_engine(load_settings(data_dir=data_dir).database_url)
    assert balance_of(portal_db.session_factory(engine), "wallet:1") == 2_500_000
    engine.dispose()


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (("ann", "ten"), "gpuportal: 'ten' is not an amount; write it like 10 or 2.5.\n"),
        (("ann", "--", "-5"), "gpuportal: amount must be more than zero (got -5000000).\n"),
        (("ann", "0"), "gpuportal: amount must be more than zero (got 0).\n"),
        (
            ("zed", "1"),
            "gpuportal: there is no portal account named 'zed'; the user must log "
            "in to the hub once (or wait for the next hub sync).\n",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(data_dir: Path, args: tuple[str, ...], line: str) -> None:
    assert run(*args) == (2, line)
