"""``gpuportal provider ...``: join a marketplace and manage this machine's listing.

Added to the ``gpuportal`` command by the hub's CLI; it imports nothing of the
hub and reaches the portal over HTTP only. Every problem an operator can fix is
one line on stderr and exit code 2.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from . import money, workload
from .agent import Agent, AgentError, Portal, inventory, models_of
from .identity import Identity, IdentityError, default_config_dir
from .isolation import node_isolation
from .raynode import AUTH_TOKEN_FILE, RayNode, RayStartError, ensure_auth_token

F = TypeVar("F", bound=Callable[..., Any])


def friendly(func: F) -> F:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (AgentError, IdentityError, RayStartError) as exc:
            click.echo(f"gpuportal provider: {exc}", err=True)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]


def parse_price(text: str) -> int:
    """Credits per GPU-hour ("1.20") as integer micro-credits, exactly (money.parse_credits)."""
    refused = f"price {text!r} must be positive with at most 6 decimals."
    try:
        micro = money.parse_credits(text)
    except money.NotAnAmount:
        raise AgentError(
            f"price {text!r} is not a number of credits per GPU-hour, e.g. 1.20."
        ) from None
    except money.TooManyDecimals:
        raise AgentError(refused) from None
    if micro <= 0:
        raise AgentError(refused)
    return micro


def config_dir_option(func: F) -> F:
    return click.option(
        "--config-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Where the node key and settings live [env GPUPORTAL_PROVIDER_DIR; default "
        "~/.config/gpuportal-provider].",
    )(func)


def hub_options(func: F) -> F:
    func = click.option(
        "--token",
        envvar="GPUPORTAL_PROVIDER_TOKEN",
        default=None,
        help="Your hub API token [env GPUPORTAL_PROVIDER_TOKEN].",
    )(func)
    func = click.option(
        "--hub",
        "hub_url",
        envvar="GPUPORTAL_HUB_URL",
        default=None,
        help="The portal's URL, e.g. https://gpus.example.org "
        "[env GPUPORTAL_HUB_URL; default: the one joined].",
    )(func)
    return func


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)


@click.group("provider")
def provider() -> None:
    """Offer this machine's GPUs on a gpuportal marketplace.

    Start with `gpuportal provider join --hub URL --token TOKEN`. Your hub user
    must be in the `providers` group (an admin adds you).
    """


@provider.command()
@hub_options
@click.option(
    "--price",
    default="1.00",
    show_default=True,
    help="Credits per GPU-hour, e.g. 1.20 (within the platform's bounds).",
)
@click.option("--region", default="unknown", show_default=True, help="Where the GPUs are.")
@click.option("--country", default=None, help="Two-letter country code, e.g. DE.")
@click.option("--wallet", default=None, help="Solana public key for payouts.")
@click.option("--name", "display_name", default=None, help="Name shown to customers.")
@click.option(
    "--ray-address",
    default=None,
    help="Join this existing Ray cluster (HOST:PORT) instead of starting a head.",
)
@click.option(
    "--jobs-url",
    default=None,
    help="Jobs API URL of the cluster (needed with --ray-address or --no-ray).",
)
@click.option("--no-ray", is_flag=True, help="Do not start Ray (it is managed elsewhere).")
@click.option(
    "--demo",
    is_flag=True,
    help="No NVIDIA GPU: declare logical demo GPUs (never paid on a real chain).",
)
@click.option(
    "--demo-gpus",
    default="1xDEMO-GPU",
    show_default=True,
    help="Demo GPUs to declare with --demo, e.g. 2xA100-80GB.",
)
@click.option("--once", is_flag=True, help="Register, verify and send one heartbeat, then exit.")
@click.option("--num-cpus", type=int, default=1, show_default=True, help="CPUs for Ray.")
@config_dir_option
@friendly
def join(
    hub_url: str | None,
    token: str | None,
    price: str,
    region: str,
    country: str | None,
    wallet: str | None,
    display_name: str | None,
    ray_address: str | None,
    jobs_url: str | None,
    no_ray: bool,
    demo: bool,
    demo_gpus: str,
    once: bool,
    num_cpus: int,
    config_dir: Path | None,
) -> None:
    """Join a marketplace: identity, GPU inventory, Ray, registration, verification,
    then heartbeats until stopped (Ctrl-C)."""
    _setup_logging()
    if not hub_url:
        raise AgentError("--hub URL is required (the portal's address).")
    if not token:
        raise AgentError(
            "--token is required: a hub API token of a user in the providers "
            "group (hub → Token page)."
        )
    micro = parse_price(price)
    if (no_ray or ray_address) and not jobs_url:
        raise AgentError(
            "--jobs-url is required with --no-ray or --ray-address (the "
            "cluster's Ray dashboard, e.g. http://HEAD:8265)."
        )
    identity = Identity.create_or_load(config_dir or default_config_dir())
    gpus, driver = inventory(demo, demo_gpus, identity.node_id)
    click.echo(
        f"node {identity.node_id}: {len(gpus)} GPU(s) "
        f"{', '.join(f'{n}x {m}' for m, n in models_of(gpus).items())}"
        f"{' (DEMO, logical GPUs)' if demo else ''}"
    )
    ray: RayNode | None = None
    # The cluster's Ray token: made here for a new head; a worker joining a cluster
    # finds the head's token in this file (and so may a node whose Ray runs already).
    token_path = identity.config_dir / AUTH_TOKEN_FILE
    if ray_address and not no_ray and not token_path.exists():
        raise AgentError(
            f"put the cluster's Ray token (the head's {AUTH_TOKEN_FILE}) in {token_path} "
            "first: every gpuportal Ray cluster runs with token authentication."
        )
    if not no_ray:
        ray = RayNode.start(
            identity.node_id,
            models_of(gpus),
            demo,
            identity.config_dir / "ray.log",
            address=ray_address,
            num_cpus=num_cpus,
            token_path=token_path,
        )
        jobs_url = jobs_url or ray.jobs_url
        click.echo(
            f"Ray: {'joined ' + ray_address if ray_address else 'head'} "
            f"(pid {ray.proc.pid}), Jobs API {jobs_url}"
        )
    ray_token = ensure_auth_token(token_path) if ray or token_path.exists() else None
    # The challenge in the registration reply is timed from the moment it is issued.
    workload.warm_up([g.index for g in gpus], demo)
    portal = Portal(hub_url, identity, token)
    try:
        reply = portal.call(
            "POST",
            "/api/v1/providers/register",
            {
                "display_name": display_name,
                "region": region,
                "country": country,
                "payout_wallet": wallet,
                "price_per_gpu_hour": micro,
                "jobs_url": jobs_url,
                "ray_address": ray.address if ray else ray_address,
                "ray_token": ray_token,
                "node": {
                    "node_id": identity.node_id,
                    "public_key": identity.public_key,
                    "demo": demo,
                    "isolation": node_isolation(),
                    "driver_version": driver,
                    "gpus": [g.claim() for g in gpus],
                },
            },
        )
        identity.state.hub_url, identity.state.region, identity.state.price = hub_url, region, micro
        identity.state.demo, identity.state.demo_gpus = demo, demo_gpus if demo else ""
        identity.state.jobs_url = jobs_url or ""
        identity.save()
        click.echo(f"registered with {hub_url} (provider {reply['provider_id']}); verifying ...")
        agent = Agent(portal, identity, gpus, demo, float(reply["heartbeat_seconds"]))
        verdict = agent.answer(reply["challenge"])
        click.echo(
            f"verification: {'passed' if verdict['passed'] else 'FAILED'} ({verdict['detail']})"
        )
        agent.heartbeat()
        if once:
            return
        click.echo("sending heartbeats; Ctrl-C stops this node's agent.")
        _run_until_signal(agent)
    finally:
        portal.close()
        if ray is not None:
            ray.stop()


def _run_until_signal(agent: Agent) -> None:
    stop = threading.Event()

    def on_signal(_signum: int, _frame: object) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        agent.run(stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@provider.command()
@click.option(
    "--hub",
    "hub_url",
    envvar="GPUPORTAL_HUB_URL",
    default=None,
    help="The portal's URL [default: the one this node joined].",
)
@click.option("--once", is_flag=True, help="Verify and send one heartbeat, then exit.")
@config_dir_option
@friendly
def run(hub_url: str | None, once: bool, config_dir: Path | None) -> None:
    """Run the agent of a node that is already registered: verify, then heartbeat.

    `gpuportal up` uses this for the house node, which the control plane
    registers itself.
    """
    _setup_logging()
    identity = Identity.load(config_dir or default_config_dir())
    hub = hub_url or identity.state.hub_url
    if not hub:
        raise AgentError("this node has not joined a hub yet; run `gpuportal provider join`.")
    gpus, _driver = inventory(identity.state.demo, identity.state.demo_gpus, identity.node_id)
    workload.warm_up([g.index for g in gpus], identity.state.demo)
    portal = Portal(hub, identity)
    try:
        agent = Agent(portal, identity, gpus, identity.state.demo)
        verdict = agent.verify()
        click.echo(
            f"node {identity.node_id}: verification "
            f"{'passed' if verdict['passed'] else 'FAILED'} ({verdict['detail']})"
        )
        agent.heartbeat()
        if not once:
            _run_until_signal(agent)
    finally:
        portal.close()


def _portal(
    hub_url: str | None, token: str | None, config_dir: Path | None
) -> tuple[Portal, Identity | None]:
    identity = None
    with contextlib.suppress(IdentityError):
        identity = Identity.load(config_dir or default_config_dir())
    hub = hub_url or (identity.state.hub_url if identity else "")
    if not hub:
        raise AgentError("--hub URL is required (this machine has not joined a hub).")
    return Portal(hub, identity, token), identity


@provider.command()
@hub_options
@config_dir_option
@friendly
def status(hub_url: str | None, token: str | None, config_dir: Path | None) -> None:
    """Your provider listing and nodes, as the portal sees them."""
    portal, _identity = _portal(hub_url, token, config_dir)
    with _closing(portal):
        me = portal.call("GET", "/api/v1/providers/me")
    click.echo(
        f"provider {me['display_name']} ({me['status']}), region {me['region']}, "
        f"{me['price_per_gpu_hour_display']}/GPU-hour"
    )
    for node in me["nodes"]:
        exclusive = node.get("isolation") == "exclusive"
        click.echo(
            f"  node {node['node_id']}: {node['status']}, {node['verification']}, "
            f"reliability {node['reliability']}, {len(node['gpus'])} GPU(s)"
            f"{', DEMO' if node['demo'] else ''}{', BLOCKED' if node['blocked'] else ''}"
            f"{', EXCLUSIVE: one customer at a time (not root)' if exclusive else ''}"
        )


class _closing:
    def __init__(self, portal: Portal) -> None:
        self.portal = portal

    def __enter__(self) -> Portal:
        return self.portal

    def __exit__(self, *_exc: object) -> None:
        self.portal.close()


@provider.command("set-price")
@click.argument("price")
@hub_options
@config_dir_option
@friendly
def set_price(price: str, hub_url: str | None, token: str | None, config_dir: Path | None) -> None:
    """Set the price per GPU-hour in credits, e.g. 1.20. Running sessions keep theirs."""
    micro = parse_price(price)
    portal, _identity = _portal(hub_url, token, config_dir)
    with _closing(portal):
        me = portal.call("PATCH", "/api/v1/providers/me", {"price_per_gpu_hour": micro})
    click.echo(f"price set to {me['price_per_gpu_hour_display']}/GPU-hour for new reservations")


def _set_status(
    value: str, hub_url: str | None, token: str | None, config_dir: Path | None
) -> None:
    portal, _identity = _portal(hub_url, token, config_dir)
    with _closing(portal):
        me = portal.call("PATCH", "/api/v1/providers/me", {"status": value})
    click.echo(f"provider {me['display_name']} is {me['status']}")


@provider.command()
@hub_options
@config_dir_option
@friendly
def pause(hub_url: str | None, token: str | None, config_dir: Path | None) -> None:
    """Stop taking new reservations (running sessions continue)."""
    _set_status("paused", hub_url, token, config_dir)


@provider.command()
@hub_options
@config_dir_option
@friendly
def resume(hub_url: str | None, token: str | None, config_dir: Path | None) -> None:
    """Take new reservations again."""
    _set_status("listed", hub_url, token, config_dir)


@provider.command()
@hub_options
@config_dir_option
@friendly
def leave(hub_url: str | None, token: str | None, config_dir: Path | None) -> None:
    """Take this machine's node off the marketplace."""
    portal, identity = _portal(hub_url, token, config_dir)
    if identity is None:
        raise AgentError("this machine has no node identity; nothing to leave.")
    with _closing(portal):
        node = portal.call("DELETE", f"/api/v1/providers/me/nodes/{identity.node_id}")
    click.echo(f"node {node['node_id']} left the marketplace")
