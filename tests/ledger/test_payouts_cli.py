"""``gpuportal payouts run | status | retry``: real DB, the embedded chain in the data dir."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from solders.keypair import Keypair

from gpuportal.hub import db as portal_db
from gpuportal.hub.billing import deposits, ledger
from gpuportal.hub.db.marketplace_models import Provider
from gpuportal.hub.settings import load_settings
from gpuportal.hub.stack.cli import main

from .conftest import CREDIT, T0, Clock, add_account

WALLET = str(Keypair().pubkey())


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: Clock) -> Path:
    monkeypatch.setenv("GPUPORTAL_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("GPUPORTAL_PAYOUT_PERIOD_SECONDS", "3600")
    engine = portal_db.make_engine(load_settings(data_dir=tmp_path).database_url)
    portal_db.upgrade(engine)
    sessions = portal_db.session_factory(engine)
    ann = add_account(sessions, "ann")
    with portal_db.transaction(sessions) as session:
        session.add(
            Provider(
                account_id=ann,
                display_name="ann",
                region="local",
                price_per_gpu_hour=CREDIT,
                payout_wallet=WALLET,
            )
        )
        ledger.post(
            session,
            "earned",
            "usage",
            [
                ledger.Leg(ledger.provider_earnings(session, ann).id, 3 * CREDIT),
                ledger.Leg(ledger.external(session, "grants").id, -3 * CREDIT),
            ],
            period_end=T0 + timedelta(minutes=10),
        )
    engine.dispose()
    clock.advance(2 * 3600)
    return tmp_path


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["payouts", *args])
    return result.exit_code, result.output


def test_run_then_status_shows_the_settled_payout_and_its_signature(data_dir: Path) -> None:
    code, out = cli("run")
    assert code == 0, out
    assert out.startswith("period 2026-03-01 13:00 to 14:00 UTC: 1 new payout(s), 1 advanced\n")
    assert "#1  ann  2026-03-01 13:00  3.00 credits  30000000 lamports  settled  " in out
    signature = out.split("settled  ")[1].split()[0]
    chain = deposits.LiteSVMChain(state_path=data_dir / deposits.LITESVM_STATE)
    assert chain.balance(WALLET) == 30_000_000
    assert chain.signature_status(signature) == deposits.SignatureStatus("finalized")
    code, again = cli("run")
    assert (code, "0 new payout(s)" in again) == (0, True)
    code, status = cli("status", "--provider", "ann")
    assert code == 0 and status.startswith("treasury ")
    assert f"settled  {signature}" in status


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (("retry", "7"), "gpuportal: there is no payout 7.\n"),
        (("status", "--provider", "zed"), "gpuportal: there is no account 'zed'.\n"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(data_dir: Path, args: tuple[str, ...], line: str) -> None:
    code, out = cli(*args)
    assert (code, out.splitlines()[-1] + "\n") == (2, line)


def test_retrying_a_settled_payout_is_refused_in_one_line(data_dir: Path) -> None:
    cli("run")
    assert cli("retry", "1") == (
        2,
        "gpuportal: payout 1 is settled; only a failed payout can be retried.\n",
    )
    code, out = cli("retry", "0")
    assert code == 2 and "Traceback" not in out
