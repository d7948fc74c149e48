"""Settings for every gpuportal process, read from ``GPUPORTAL_*`` environment variables.

One pydantic-settings model serves the CLI (``gpuportal up``), the embedded
``jupyterhub_config.py`` and the portal service, so a value means the same thing
everywhere and is validated once. The README's configuration table lists every
field here; keep the two in step.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from .errors import ConfigError

#: Database drivers the portal supports, by the dialect+driver SQLAlchemy reports.
SUPPORTED_DB_DRIVERS = {"sqlite+pysqlite", "postgresql+psycopg"}


def _default_cpus() -> int:
    # Ray on a laptop or a 2-core CI box stays small: the hub, proxy and portal
    # need CPU too.
    return max(1, min(4, os.cpu_count() or 1))


class Settings(BaseSettings):
    """All knobs of the embedded deployment and the portal service.

    Each field is read from ``GPUPORTAL_<FIELD>`` (upper case); for example
    ``GPUPORTAL_PORT=9000 gpuportal up`` serves the portal on port 9000.
    """

    model_config = SettingsConfigDict(
        env_prefix="GPUPORTAL_", extra="ignore", populate_by_name=True
    )

    data_dir: Path = Field(
        Path(".gpuportal"),
        description="Holds the SQLite files, cookie secret, passwords, logs and pid files.",
    )
    port: int = Field(8000, description="Public port of the portal (the proxy), on 127.0.0.1.")
    hub_port: int = Field(8081, description="Internal port of the JupyterHub process.")
    proxy_api_port: int = Field(8001, description="Port of the proxy's REST API.")
    portal_port: int = Field(8002, description="Port of the portal service (FastAPI).")
    dashboards_port: int = Field(8003, description="Port of the dashboards service (Voila).")
    db_url: str = Field(
        "",
        description="Portal DB URL. Empty: SQLite in the data dir. "
        "PostgreSQL: postgresql+psycopg://user@host:5432/dbname",
    )
    redis_url: str = Field(
        "", description="Redis URL for the cache, e.g. redis://127.0.0.1:6379/0. Empty: in-process."
    )
    admin_user: str = Field("admin", description="Hub admin created on first start.")
    admin_password: SecretStr | None = Field(
        None,
        description="Password for the admin. Unset: generated once, saved 0600 in the data dir.",
    )
    min_password_length: int = Field(8, description="Shortest password sign-up accepts.")
    authenticator: str = Field(
        "firstuse",
        description="'firstuse' (sign-up by first login) or an Authenticator class, e.g. "
        "oauthenticator.github.GitHubOAuthenticator",
    )
    demo_gpus: str = Field(
        "",
        description="Logical GPUs to declare when NVML finds none, e.g. 2xA100-80GB. "
        "Empty on a machine without GPUs: 2xDEMO-GPU.",
    )
    ray_port: int = Field(6380, description="GCS port of the local Ray head.")
    ray_dashboard_port: int = Field(8265, description="Ray dashboard / Jobs API port.")
    ray_dashboard_url: str = Field(
        "",
        description="Jobs API URL of an already running Ray cluster to use instead of "
        "starting a local head.",
    )
    ray_token_file: str = Field(
        "",
        description="File holding the Ray token of the house cluster (or of the cluster at "
        "GPUPORTAL_RAY_DASHBOARD_URL). Empty: ray-auth-token in the data dir, made 0600 on "
        "first start. Only the spawner, the portal and the node agent read it.",
    )
    homes_dir: str = Field(
        "",
        description="Where the house node keeps customers' home directories (one per "
        "customer, mode 0700, owned by the customer's own OS user). Empty: a folder "
        "named after the data dir with -homes appended, beside it.",
    )
    ray_num_cpus: int = Field(default_factory=_default_cpus, description="CPUs Ray may use.")
    ray_object_store_mb: int = Field(200, description="Ray object store size, in MiB.")
    auth_cache_seconds: float = Field(
        3.0,
        ge=0,
        le=10,
        description="How long a verified hub token is cached for reads, in seconds (0 to 10; "
        "0 asks the hub every time). Writes always ask the hub, so a revoked token or a "
        "removed role never changes anything, and reads follow the hub within this time.",
    )
    hub_sync_seconds: float = Field(
        60.0, description="How often the portal syncs accounts and teams from the hub, seconds."
    )
    log_level: str = Field("INFO", description="Log level of the portal service.")

    # --- Billing: metering, runway, quotas, deposits (docs/billing.md) ---
    currency_name: str = Field(
        "credits", description="Display name of the platform currency (1 credit = 10^6 micro)."
    )
    meter_interval_seconds: int = Field(
        30, description="Length of one metering interval, seconds; one charge per interval."
    )
    min_billable_seconds: int = Field(
        900, description="A spawn needs credit for at least this long (seconds)."
    )
    runway_warning_seconds: int = Field(
        600, description="Warn a running server when its payer's runway drops below this."
    )
    grace_seconds: int = Field(
        120, description="Seconds between running out of credit and the server being stopped."
    )
    signup_credits: int = Field(
        10_000_000,
        description="Credit a new account gets once, if vouched for (see "
        "GPUPORTAL_SIGNUP_CREDIT_POLICY), in micro-credits (10_000_000 = 10 credits); 0: none.",
    )
    signup_credit_policy: Literal["auto", "approved", "identity"] = Field(
        "auto",
        description="Who gets the sign-up credit: 'approved' (only accounts an admin approves "
        "with POST /api/v1/credits/signup), 'identity' (every account: the authenticator, e.g. "
        "OAuth, vouches for each person), 'auto' ('approved' under open sign-up such as "
        "firstuse, else 'identity').",
    )
    signup_credit_daily_budget: int = Field(
        100_000_000,
        description="Most sign-up credit granted per UTC day, all accounts together, in "
        "micro-credits (100_000_000 = 100 credits); 0: none.",
    )
    solana_rpc_url: str = Field(
        "", description="Solana RPC endpoint for deposits. Empty: the in-process LiteSVM chain."
    )
    solana_deposit_address: str = Field(
        "", description="Base58 address customers send SOL to. Empty: one is made in the data dir."
    )
    solana_micro_credits_per_sol: int = Field(
        100_000_000, description="Micro-credits credited per SOL deposited (default 100 credits)."
    )
    usdc_mint: str = Field(
        "",
        description="Base58 mint of the USDC (SPL token) customers may deposit; transfers to the "
        "deposit address's associated token account for it are credited. Empty: on the embedded "
        "LiteSVM chain a demo mint made once in the data dir; required with an RPC endpoint.",
    )
    micro_credits_per_usdc: int = Field(
        1_000_000,
        description="Micro-credits credited per USDC deposited (default 1 credit; USDC has 6 "
        "decimals, so 1 micro-credit per base unit).",
    )

    # --- Payouts to providers (docs/payouts.md) ---
    payout_asset: Literal["SOL", "USDC"] = Field(
        "SOL",
        description="What providers are paid in: SOL (lamports) or USDC (to the wallet's "
        "associated token account for GPUPORTAL_USDC_MINT).",
    )
    payout_period_seconds: int = Field(
        86_400,
        description="Length of one payout period, seconds, on a fixed grid from 1970-01-01 UTC "
        "(default one UTC day). One payout per provider and period.",
    )
    payout_minimum: int = Field(
        1_000_000,
        description="Smallest payout, micro-credits (1_000_000 = 1 credit); less waits for a "
        "later period.",
    )
    payout_micro_credits_per_sol: int = Field(
        100_000_000, description="Micro-credits paid out per SOL (default 100 credits per SOL)."
    )
    payout_micro_credits_per_usdc: int = Field(
        1_000_000, description="Micro-credits paid out per USDC (default 1 credit per USDC)."
    )
    payout_commitment: Literal["processed", "confirmed", "finalized"] = Field(
        "finalized", description="A payout settles only when its transfer reaches this commitment."
    )
    payout_schedule_seconds: int = Field(
        86_400,
        description="How often the portal runs payouts by itself, seconds (default daily); 0: "
        "never (run them with `gpuportal payouts run`). Open payouts are resumed every "
        "meter interval either way.",
    )
    solana_treasury_keypair: str = Field(
        "",
        description="Path of the treasury keypair file (a JSON array of 64 bytes, mode 0600) "
        "that pays providers; required with GPUPORTAL_SOLANA_RPC_URL. Empty on the embedded "
        "chain: a treasury made once in the data dir and funded at start. The path is read, "
        "never the key itself from the environment.",
    )
    litesvm_treasury_lamports: int = Field(
        1_000 * 10**9,
        description="Lamports the embedded chain's treasury is topped up to at start.",
    )

    # --- Marketplace -------------------------------------------------------------
    trusted_services: str = Field(
        "ray-spawner",
        description="Comma-separated hub service names that may act for any user: reserve, "
        "activate and release GPUs, open and close allocations (the spawner). Empty: none.",
    )
    reservation_hold_seconds: int = Field(
        600,
        description="How long a held (not yet activated) reservation keeps its GPUs, in "
        "seconds, before it expires and gives them back.",
    )
    max_live_reservations: int = Field(
        4,
        description="Most reservations (held or active: starting or running servers) one user "
        "may have at once; each must also be paid for (see docs/billing.md).",
    )
    region: str = Field("local", description="Region of the house provider's GPUs.")
    house_price: int = Field(
        1_000_000,
        description="Price of the house provider's GPUs, micro-credits per GPU-hour "
        "(1_000_000 = 1.00 credit/h).",
    )
    min_price: int = Field(
        10_000, description="Lowest price a provider may set, micro-credits per GPU-hour."
    )
    max_price: int = Field(
        1_000_000_000, description="Highest price a provider may set, micro-credits per GPU-hour."
    )
    reliability_start: float = Field(
        0.9,
        description="Reliability score (0..1) of a new node, before it has any history.",
    )
    reliability_delist: float = Field(
        0.5,
        description="Nodes whose reliability score falls below this (0..1) are not placed.",
    )
    heartbeat_seconds: int = Field(
        10, description="How often provider agents send a signed heartbeat, in seconds."
    )
    heartbeat_missed: int = Field(
        3, description="Missed heartbeats after which a node is offline and unschedulable."
    )
    heartbeat_batch_seconds: float = Field(
        0.0,
        ge=0,
        le=60,
        description="Batch routine heartbeats: accept them without SQL (replay check and "
        "liveness in Redis) and write last-seen times and rollups every this many seconds, "
        "e.g. 2. Needs GPUPORTAL_REDIS_URL. 0 (the default): every heartbeat commits at once.",
    )
    verification_interval_seconds: int = Field(
        3600, description="How often a node must pass a fresh verification challenge, seconds."
    )
    challenge_deadline_seconds: int = Field(
        300,
        description="How long a demo node has to answer its (CPU) verification challenge, "
        "seconds. Real GPUs get the deadline of their claimed model (docs/providers.md).",
    )
    provider_networks_allowed: str = Field(
        "",
        description="Comma-separated networks (CIDR) where the portal may fetch a "
        "provider's jobs_url although they are not public, e.g. 10.20.0.0/16 for a "
        "private provider site. Loopback, private and link-local addresses are refused "
        "otherwise; the house node is always allowed.",
    )
    node_clock_skew_seconds: int = Field(
        60,
        description="Largest difference between a signed request's timestamp and the "
        "portal's clock, seconds; older or newer requests are rejected as stale.",
    )
    platform_fee_bps: int = Field(
        1000,
        description="Platform fee in basis points of each charge (1000 = 10%), locked "
        "into every reservation.",
    )

    # Set by JupyterHub for a hub-managed service; defaults fit the embedded stack.
    hub_api_url: str = Field("http://127.0.0.1:8081/hub/api", validation_alias="JUPYTERHUB_API_URL")
    service_prefix: str = Field("/services/portal/", validation_alias="JUPYTERHUB_SERVICE_PREFIX")
    service_url: str = Field("http://127.0.0.1:8002", validation_alias="JUPYTERHUB_SERVICE_URL")
    api_token: SecretStr = Field(SecretStr(""), validation_alias="JUPYTERHUB_API_TOKEN")

    @field_validator(
        "port",
        "hub_port",
        "proxy_api_port",
        "portal_port",
        "dashboards_port",
        "ray_port",
        "ray_dashboard_port",
    )
    @classmethod
    def _valid_port(cls, value: int) -> int:
        if not 1 <= value <= 65535:
            raise ValueError("must be a TCP port between 1 and 65535")
        return value

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator(
        "ray_num_cpus",
        "ray_object_store_mb",
        "min_password_length",
        "meter_interval_seconds",
        "min_billable_seconds",
        "solana_micro_credits_per_sol",
        "micro_credits_per_usdc",
        "payout_period_seconds",
        "payout_minimum",
        "payout_micro_credits_per_sol",
        "payout_micro_credits_per_usdc",
        "reservation_hold_seconds",
        "max_live_reservations",
        "house_price",
        "min_price",
        "max_price",
        "heartbeat_seconds",
        "heartbeat_missed",
        "verification_interval_seconds",
        "challenge_deadline_seconds",
        "node_clock_skew_seconds",
    )
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be a positive integer")
        return value

    @field_validator("provider_networks_allowed")
    @classmethod
    def _networks(cls, value: str) -> str:
        from .egress import parse_networks

        parse_networks(value)  # ValueError with the bad part
        return value

    @field_validator("reliability_start", "reliability_delist")
    @classmethod
    def _fraction(cls, value: float) -> float:
        if not 0.0 <= value <= 1.0:
            raise ValueError("must be a fraction between 0 and 1")
        return value

    @field_validator("platform_fee_bps")
    @classmethod
    def _basis_points(cls, value: int) -> int:
        if not 0 <= value <= 10_000:
            raise ValueError("must be basis points between 0 and 10000")
        return value

    @field_validator("region")
    @classmethod
    def _region_name(cls, value: str) -> str:
        value = value.strip()
        if not value or len(value) > 64:
            raise ValueError("must be a region name of 1 to 64 characters")
        return value

    @field_validator("service_prefix")
    @classmethod
    def _slashes(cls, value: str) -> str:
        return "/" + value.strip("/") + "/"

    @field_validator("max_price", "house_price", "min_price")
    @classmethod
    def _price_ceiling(cls, value: int) -> int:
        # ledger.MAX_PRICE: with up to 1024 GPUs no charge or sum can overflow 64 bits.
        if value > 10**12:
            raise ValueError("must be at most 10**12 micro-credits per GPU-hour")
        return value

    @field_validator("signup_credits")
    @classmethod
    def _signup_amount(cls, value: int) -> int:
        if not 0 <= value <= 10**15:
            raise ValueError("must be between 0 and 10**15 micro-credits")
        return value

    @model_validator(mode="after")
    def _price_bounds(self) -> Settings:
        if self.min_price > self.max_price:
            raise ValueError("GPUPORTAL_MIN_PRICE must not exceed GPUPORTAL_MAX_PRICE")
        if not self.min_price <= self.house_price <= self.max_price:
            raise ValueError(
                "GPUPORTAL_HOUSE_PRICE must lie between GPUPORTAL_MIN_PRICE and GPUPORTAL_MAX_PRICE"
            )
        return self

    @cached_property
    def database_url(self) -> URL:
        """The portal DB URL, validated; SQLite in the data dir when unset."""
        return parse_db_url(self.db_url, self.data_dir)

    @field_validator("runway_warning_seconds", "grace_seconds", "signup_credit_daily_budget")
    @classmethod
    def _not_negative(cls, value: int) -> int:
        if value < 0:
            raise ValueError("must not be negative")
        return value

    @property
    def trusted_service_names(self) -> frozenset[str]:
        """The hub services allowed to act for any user (``trusted_services`` parsed)."""
        return frozenset(n.strip() for n in self.trusted_services.split(",") if n.strip())

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "portal.sqlite"

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def run_dir(self) -> Path:
        return self.data_dir / "run"

    @property
    def ray_token_path(self) -> Path:
        """The house cluster's Ray token file."""
        if self.ray_token_file:
            return Path(self.ray_token_file).expanduser().resolve()
        return self.data_dir / "ray-auth-token"

    @property
    def homes_path(self) -> Path:
        """Customers' homes on the house node: outside the data dir, which is 0700."""
        if self.homes_dir:
            return Path(self.homes_dir).expanduser().resolve()
        return self.data_dir.parent / f"{self.data_dir.name}-homes"

    @property
    def ray_jobs_url(self) -> str:
        """Where the Jobs API of the house Ray cluster answers."""
        return self.ray_dashboard_url or f"http://127.0.0.1:{self.ray_dashboard_port}"


def parse_db_url(raw: str, data_dir: Path) -> URL:
    """Validate ``GPUPORTAL_DB_URL`` and name the variable in any error.

    ``postgresql://`` is taken to mean psycopg 3; other drivers are refused
    because the portal is tested only on these two.
    """
    if not raw:
        return URL.create("sqlite+pysqlite", database=str(data_dir / "portal.sqlite"))
    try:
        url = make_url(raw)
    except ArgumentError:
        raise ConfigError(
            f"GPUPORTAL_DB_URL is not a database URL: {_redact(raw)!r}. "
            "Use e.g. postgresql+psycopg://user@127.0.0.1:5432/portal"
        ) from None
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    elif url.drivername == "sqlite":
        url = url.set(drivername="sqlite+pysqlite")
    if url.drivername not in SUPPORTED_DB_DRIVERS:
        raise ConfigError(
            f"GPUPORTAL_DB_URL uses the driver {url.drivername!r}; gpuportal supports "
            "SQLite (sqlite:///path) and PostgreSQL (postgresql+psycopg://...)."
        )
    if url.drivername.startswith("postgresql") and not url.database:
        raise ConfigError("GPUPORTAL_DB_URL names no database: add /dbname to the URL.")
    return url


def _redact(raw: str) -> str:
    # Never echo a password back into a terminal or a log.
    if "@" in raw and "://" in raw:
        scheme, rest = raw.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return raw


def load_settings(**overrides: object) -> Settings:
    """Read the settings, turning a validation error into one clear :class:`ConfigError`."""
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
        settings.database_url  # noqa: B018  (validate the DB URL eagerly)
    except ValidationError as exc:
        err = exc.errors()[0]
        if not err["loc"]:  # a check across fields names its variables itself
            raise ConfigError(str(err["msg"]).removeprefix("Value error, ") + ".") from None
        field = str(err["loc"][0])
        raise ConfigError(
            f"GPUPORTAL_{field.upper()}: {err['msg']} (got {err.get('input')!r})."
        ) from None
    return settings
