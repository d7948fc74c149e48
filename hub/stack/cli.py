"""The ``gpuportal`` command.

Every subcommand turns a configuration problem into one line on stderr and
exit code 2; no traceback reaches the operator.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from .. import __version__
from ..errors import ConfigError
from ..settings import Settings, load_settings

F = TypeVar("F", bound=Callable[..., Any])


def friendly(func: F) -> F:
    """Report ConfigError as one line and exit 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ConfigError as exc:
            click.echo(f"gpuportal: {exc}", err=True)
            sys.exit(exc.exit_code)

    return wrapper  # type: ignore[return-value]


def data_dir_option(func: F) -> F:
    return click.option(
        "--data-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Data directory [env GPUPORTAL_DATA_DIR; default ./.gpuportal].",
    )(func)


def settings_with(**overrides: Any) -> Settings:
    """Settings from the environment, with command-line options taking precedence."""
    for key, value in overrides.items():
        if value is not None:
            os.environ[f"GPUPORTAL_{key.upper()}"] = str(value)
    return load_settings()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gpuportal")
def main() -> None:
    """gpuportal: a Jupyter-native GPU cloud.

    Start everything on this machine with `gpuportal up`, then open
    http://127.0.0.1:8000. Configuration comes from GPUPORTAL_* environment
    variables (see the README) or the options of each command.
    """


@main.command()
@click.option(
    "--config",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("jupyterhub_config.py"),
    show_default=True,
    help="JupyterHub config file of the deployment.",
)
@click.option(
    "--port",
    type=int,
    default=None,
    help="Public port on 127.0.0.1 [env GPUPORTAL_PORT; default 8000].",
)
@click.option(
    "--demo-gpus",
    default=None,
    metavar="SPEC",
    help="Logical GPUs when NVML finds none, e.g. 2xA100-80GB [env GPUPORTAL_DEMO_GPUS].",
)
@click.option("--quiet", is_flag=True, help="Write JupyterHub's log only to the log file.")
@data_dir_option
@friendly
def up(
    config: Path, port: int | None, demo_gpus: str | None, quiet: bool, data_dir: Path | None
) -> None:
    """Start the whole embedded stack in the foreground.

    Starts (or reuses) a local Ray head on 127.0.0.1, then JupyterHub, which
    runs the proxy and the portal service. Ctrl-C stops everything it started.
    """
    from .updown import up as run_up

    settings = settings_with(port=port, demo_gpus=demo_gpus, data_dir=data_dir)
    sys.exit(run_up(settings, config, click.echo, hub_output=not quiet))


@main.command()
@data_dir_option
@friendly
def down(data_dir: Path | None) -> None:
    """Stop what `gpuportal up` started for this data directory."""
    from .updown import down as run_down

    sys.exit(run_down(settings_with(data_dir=data_dir), click.echo))


@main.group("db")
def db_group() -> None:
    """The portal database (GPUPORTAL_DB_URL; SQLite in the data dir by default)."""


@db_group.command("upgrade")
@click.option(
    "--revision", default="heads", show_default=True, help="Alembic revision to upgrade to."
)
@data_dir_option
@friendly
def db_upgrade(revision: str, data_dir: Path | None) -> None:
    """Create or migrate the portal database schema."""
    from .. import db

    settings = settings_with(data_dir=data_dir)
    engine = db.make_engine(settings.database_url)
    try:
        db.upgrade(engine, revision)
        current = db.current_revision(engine)
    finally:
        engine.dispose()
    url = settings.database_url.render_as_string(hide_password=True)
    click.echo(f"portal database {url} is at revision {current}")


@main.group("admin")
def admin_group() -> None:
    """Hub administrators."""


@admin_group.command("create")
@click.argument("username")
@click.option(
    "--password",
    prompt=True,
    hide_input=True,
    confirmation_prompt=True,
    envvar="GPUPORTAL_NEW_ADMIN_PASSWORD",
    help="Password (asked for when not given) [env GPUPORTAL_NEW_ADMIN_PASSWORD].",
)
@data_dir_option
@friendly
def admin_create(username: str, password: str, data_dir: Path | None) -> None:
    """Create (or reset) a hub admin who logs in with USERNAME and a password.

    Takes effect at the next `gpuportal up`; works with the default
    first-use authenticator.
    """
    from .admin import add_admin, set_password

    settings = settings_with(data_dir=data_dir)
    set_password(settings.data_dir, username, password, settings.min_password_length)
    add_admin(settings.data_dir, username)
    click.echo(f"admin {username!r} is ready; restart gpuportal for the hub to see it.")


@main.group("credits")
def credits_group() -> None:
    """Credits in the portal ledger (micro-credit exact; see docs/billing.md)."""


@credits_group.command("grant")
@click.argument("user")
@click.argument("amount")
@click.option("--promo", is_flag=True, help="Book it as promotional credit, not a grant.")
@click.option("--key", default=None, help="Idempotency key: the same key grants only once.")
@click.option("--memo", default="", help="A note kept with the transaction.")
@data_dir_option
@friendly
def credits_grant(
    user: str, amount: str, promo: bool, key: str | None, memo: str, data_dir: Path | None
) -> None:
    """Give USER AMOUNT credits (e.g. 10 or 2.5), written straight to the portal DB."""
    from sqlalchemy import select

    from gpuportal.provider import money
    from gpuportal.provider.money import format_credits

    from .. import db
    from ..billing import credits, ledger
    from ..db.models import Account

    settings = settings_with(data_dir=data_dir)
    try:
        micro = money.parse_credits(amount)
    except money.InvalidAmount as exc:
        raise ConfigError(str(exc)) from None
    engine = db.make_engine(settings.database_url)
    try:
        db.upgrade(engine)

        def work(session: Any) -> tuple[int, bool, int]:
            txn, created = credits.grant(
                session,
                user=user,
                team=None,
                amount=micro,
                source="promo" if promo else "grants",
                key=key and f"grant:{key}",
                by="cli",
                memo=memo,
            )
            account = session.scalar(select(Account).where(Account.hub_name == user))
            return txn.id, created, ledger.balance(session, ledger.wallet(session, account.id).id)

        txn_id, created, balance = ledger.with_retry(db.session_factory(engine), work)
    except ledger.LedgerError as exc:
        raise ConfigError(str(exc)) from None
    finally:
        engine.dispose()
    word = "granted" if created else "already granted (same key), nothing added"
    currency = settings.currency_name
    click.echo(
        f"{word}: {format_credits(micro, currency)} to {user} (transaction {txn_id}); "
        f"balance {format_credits(balance, currency)}"
    )


@main.command()
def version() -> None:
    """Print the versions of gpuportal and the stack it runs on."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    click.echo(f"gpuportal {__version__}")
    for dist in ("jupyterhub", "jupyter-server", "ray", "fastapi", "sqlalchemy"):
        try:
            click.echo(f"  {dist} {dist_version(dist)}")
        except PackageNotFoundError:
            click.echo(f"  {dist} not installed")


def _add_payout_commands() -> None:
    from .payouts_cli import register

    register(main, settings_with, lambda func: data_dir_option(friendly(func)))


_add_payout_commands()


def _add_provider_commands() -> None:
    # Node-side commands live with the agent (they never import the hub).
    from gpuportal.provider.cli import provider

    main.add_command(provider)


_add_provider_commands()


if __name__ == "__main__":
    main()
