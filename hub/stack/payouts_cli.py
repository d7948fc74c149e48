"""``gpuportal payouts run | status | retry``: provider payouts from the command line.

Each command works on the portal DB and the configured chain directly, as the
portal's own payout loop does (the embedded chain's state file is shared, locked,
by every process). A refusal is one line and exit code 2, never a traceback.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from gpuportal.provider.money import format_credits

from .. import db
from ..billing import deposits, ledger, payouts
from ..errors import ConfigError
from ..settings import Settings


@contextmanager
def _payout_side(
    settings: Settings, *, fund: bool = True
) -> Iterator[tuple[Any, Any, Any, str | None]]:
    """Sessions, chain, treasury and mint; a refusal becomes a ConfigError (one line)."""
    engine = db.make_engine(settings.database_url)
    try:
        db.upgrade(engine)
        chain = deposits.make_chain(settings)
        yield db.session_factory(engine), chain, *_treasury(settings, chain, fund)
    except ledger.LedgerError as exc:
        raise ConfigError(str(exc)) from None
    finally:
        engine.dispose()


def _treasury(settings: Settings, chain: Any, fund: bool) -> tuple[Any, str | None]:
    return payouts.prepare(settings, chain, fund=fund), payouts.payout_mint(settings, chain)


def _line(payout: dict[str, Any], currency: str) -> str:
    period = payout["period_start"].strftime("%Y-%m-%d %H:%M")
    parts = [
        f"#{payout['id']}",
        str(payout["provider"]),
        period,
        format_credits(payout["amount"], currency),
        f"{payout['units']} {'lamports' if payout['asset'] == 'SOL' else 'USDC units'}",
        payout["status"],
        payout["signature"] or "-",
    ]
    if payout["explorer_url"]:
        parts.append(payout["explorer_url"])
    if payout["reason"]:
        parts.append(f"({payout['reason']})")
    return "  ".join(parts)


def _show(
    sessions: Any, settings: Settings, chain: Any, ids: list[int] | None = None, **query: Any
) -> None:
    def read(session: Any) -> list[dict[str, Any]]:
        rows = payouts.history(session, **query)
        return [
            payouts.public(p, settings, chain, name)
            for p, name in rows
            if ids is None or p.id in ids
        ]

    for payout in ledger.with_retry(sessions, read):
        click.echo(_line(payout, settings.currency_name))


def register(main: click.Group, settings_with: Callable[..., Settings], options: Any) -> None:
    """Add the ``payouts`` group to ``main`` (``options`` decorates with --data-dir and the
    one-line error handling)."""

    @main.group("payouts")
    def payouts_group() -> None:
        """Provider payouts in SOL or USDC (see docs/payouts.md)."""

    @payouts_group.command("run")
    @options
    def run(data_dir: Path | None) -> None:
        """Make this period's payouts (once per provider) and advance every open one."""
        settings = settings_with(data_dir=data_dir)
        with _payout_side(settings) as (sessions, chain, vault, mint):
            result = payouts.run(sessions, settings, chain, vault, mint=mint)
            click.echo(
                f"period {result.period_start:%Y-%m-%d %H:%M} to {result.period_end:%H:%M} UTC: "
                f"{len(result.created)} new payout(s), {len(result.advanced)} advanced"
            )
            _show(sessions, settings, chain, ids=sorted(result.advanced))
            for where, problem in result.errors.items():
                click.echo(f"{where}: {problem}", err=True)

    @payouts_group.command("status")
    @click.option("--provider", default=None, help="Only this provider's payouts (hub name).")
    @click.option(
        "--status",
        "status",
        type=click.Choice(["pending", "signed", "sent", "settled", "failed"]),
        default=None,
        help="Only payouts in this state.",
    )
    @options
    def status(provider: str | None, status: str | None, data_dir: Path | None) -> None:
        """The treasury and the latest payouts, newest first."""
        from sqlalchemy import select

        from ..db.models import Account

        settings = settings_with(data_dir=data_dir)
        with _payout_side(settings, fund=False) as (sessions, chain, vault, _):
            view = payouts.treasury_view(settings, chain, vault)
            usdc = f", {view['usdc_units']} USDC units" if view["usdc_units"] is not None else ""
            click.echo(
                f"treasury {view['address']} on {view['chain']}: {view['lamports']} lamports"
                f"{usdc}; pays in {view['asset']}"
            )
            account_id = None
            if provider is not None:
                account_id = ledger.with_retry(
                    sessions,
                    lambda s: s.scalar(select(Account.id).where(Account.hub_name == provider)),
                )
                if account_id is None:
                    raise ConfigError(f"there is no account {provider!r}.")
            _show(
                sessions,
                settings,
                chain,
                account_id=account_id,
                statuses=(status,) if status else None,
                limit=50,
            )

    @payouts_group.command("retry")
    @click.argument("payout_id", type=click.IntRange(min=1))
    @options
    def retry(payout_id: int, data_dir: Path | None) -> None:
        """Try failed payout PAYOUT_ID again (its amount leaves earnings once more)."""
        settings = settings_with(data_dir=data_dir)
        with _payout_side(settings) as (sessions, chain, vault, mint):
            ledger.with_retry(sessions, lambda s: payouts.retry(s, payout_id))
            payouts.advance(sessions, settings, chain, vault, payout_id, mint=mint)
            _show(sessions, settings, chain, ids=[payout_id])
