"""One contract, two portals: the spawner's stand-in (``ContractPortal``) and the real app.

The spawner's tests run against ``tests/spawner/contract_portal.py`` so that
they can place servers on their own Ray nodes. That double is only worth
something while it answers as the real portal does. Each case below drives
the spawner's own client (``PortalClient``, the only way the hub reaches the
portal) over HTTP on 127.0.0.1 against both: the double, and the real portal
app (``create_app``) on a migrated SQLite DB with the same nodes. A route the
spawner calls that one of them lacks, or answers differently (status, error
code, the fields the spawner parses), fails here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from seed import Market
from test_reservation_billing import Hub

from gpuportal.hub import db as portal_db
from gpuportal.hub.market.marketplace import Rules
from gpuportal.hub.portal.app import create_app
from gpuportal.hub.portal.cache import MemoryCache
from gpuportal.hub.portal.context import Portal
from gpuportal.hub.settings import load_settings
from gpuportal.spawners.portal_client import PortalClient, PortalError
from tests.portal_stack import free_port
from tests.spawner.contract_portal import ContractPortal, Node, Served
from tests.spawner.contract_portal import create_app as create_contract_app

TOKEN = "tok-spawner"  # the ray-spawner service in both (test_reservation_billing.Hub)
JOBS_URL = "http://127.0.0.1:8265"
CHEAP = 1_000_000  # 1 credit per GPU-hour: the sign-up credit covers it
DEAR = 100_000_000  # 100 credits per GPU-hour: 15 minutes cost 25, more than the 10 given


def serve_contract() -> Iterator[str]:
    double = ContractPortal(
        token=TOKEN,
        nodes=[
            Node("node-a", 2, "A100-80GB", "local", CHEAP, JOBS_URL),
            Node("node-h", 1, "H100-80GB", "local", DEAR, JOBS_URL),
        ],
    )
    port = free_port()
    with Served(create_contract_app(double), port):
        yield f"http://127.0.0.1:{port}/services/portal/"


def serve_real(tmp_path: Path) -> Iterator[str]:
    settings = load_settings(
        data_dir=tmp_path,
        db_url=f"sqlite:///{tmp_path / 'portal.sqlite'}",
        ray_dashboard_url="http://127.0.0.1:9",
        # Its customers get the sign-up credit at once, so reservations are affordable.
        signup_credit_policy="identity",
    )
    engine = portal_db.make_engine(settings.database_url)
    portal_db.upgrade(engine)
    market = Market(portal_db.session_factory(engine), Rules(hold_seconds=600), {})
    market.add_node(
        "prov-a", "node-a", {"A100-80GB": 2}, price=CHEAP, region="local", jobs_url=JOBS_URL
    )
    market.add_node(
        "prov-h", "node-h", {"H100-80GB": 1}, price=DEAR, region="local", jobs_url=JOBS_URL
    )
    engine.dispose()
    portal = Portal(settings, cache=MemoryCache(), hub=Hub())
    port = free_port()
    with Served(create_app(settings, portal, background=False), port):
        yield f"http://127.0.0.1:{port}/services/portal/"


@pytest.fixture(params=["contract", "real"])
def base_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "contract":
        yield from serve_contract()
    else:
        yield from serve_real(tmp_path)


@pytest.fixture
async def portal(base_url: str) -> AsyncIterator[PortalClient]:
    client = PortalClient(base_url, TOKEN, retries=1)
    yield client
    await client.close()


async def free(portal: PortalClient, model: str) -> int:
    return sum(o["free_gpus"] for o in await portal.offers() if o["gpu_model"] == model)


async def test_offers_list_each_model_with_its_free_gpus_and_price(portal: PortalClient) -> None:
    offers = await portal.offers()
    seen = sorted(
        (o["gpu_model"], o["free_gpus"], o["total_gpus"], o["price_per_gpu_hour"]) for o in offers
    )
    assert seen == [("A100-80GB", 2, 2, CHEAP), ("H100-80GB", 1, 1, DEAR)]


async def test_a_reservation_names_the_node_its_resource_and_jobs_url(
    portal: PortalClient,
) -> None:
    held = await portal.reserve(user="ann", server_name="gpu", gpu_count=1, gpu_model="A100-80GB")
    assert (held.status, held.node_id, held.gpu_count, held.gpu_model) == (
        "held",
        "node-a",
        1,
        "A100-80GB",
    )
    assert held.jobs_url == JOBS_URL
    assert held.node_resource == "gpuportal/node:node-a"
    assert held.price_per_gpu_hour == CHEAP and held.region == "local"
    assert len(held.gpu_indices) == 1
    assert await free(portal, "A100-80GB") == 1


async def test_offers_say_how_many_gpus_one_server_can_get(portal: PortalClient) -> None:
    largest = {o["gpu_model"]: o["largest_free_gpus"] for o in await portal.offers()}
    assert largest == {"A100-80GB": 2, "H100-80GB": 1}
    await portal.reserve(user="ann", server_name="", gpu_count=1, gpu_model="A100-80GB")
    largest = {o["gpu_model"]: o["largest_free_gpus"] for o in await portal.offers()}
    assert largest["A100-80GB"] == 1


async def test_a_users_balance_names_the_minimum_billable_period(portal: PortalClient) -> None:
    # A reservation makes sure the real portal has ann's account (and sign-up credit).
    await portal.reserve(user="ann", server_name="", gpu_count=1, gpu_model="A100-80GB")
    balance = await portal.balance("ann")
    assert balance is not None
    assert (balance.balance, balance.currency, balance.min_billable_seconds) == (
        10_000_000,
        "credits",
        900,
    )


async def test_a_retry_for_the_same_server_returns_the_same_reservation(
    portal: PortalClient,
) -> None:
    first = await portal.reserve(user="ann", server_name="gpu", gpu_count=1, gpu_model="A100-80GB")
    again = await portal.reserve(user="ann", server_name="gpu", gpu_count=1, gpu_model="A100-80GB")
    assert again.id == first.id
    assert await free(portal, "A100-80GB") == 1


async def test_nothing_free_now_is_409_no_capacity(portal: PortalClient) -> None:
    await portal.reserve(user="ann", server_name="a", gpu_count=2, gpu_model="A100-80GB")
    with pytest.raises(PortalError) as refused:
        await portal.reserve(user="bob", server_name="", gpu_count=1, gpu_model="A100-80GB")
    assert (refused.value.status, refused.value.code) == (409, "no_capacity")
    assert refused.value.message


@pytest.mark.parametrize(
    ("count", "model"), [(3, "A100-80GB"), (1, "TPU-v9")], ids=["too-many", "unknown-model"]
)
async def test_a_request_no_node_could_ever_fit_is_422(
    portal: PortalClient, count: int, model: str
) -> None:
    with pytest.raises(PortalError) as refused:
        await portal.reserve(user="ann", server_name="", gpu_count=count, gpu_model=model)
    assert (refused.value.status, refused.value.code) == (422, "invalid")
    assert "A100-80GB" in refused.value.message or "at most 2" in refused.value.message


async def test_a_user_who_cannot_pay_is_402_and_the_gpus_stay_free(
    portal: PortalClient,
) -> None:
    with pytest.raises(PortalError) as refused:
        await portal.reserve(user="ann", server_name="", gpu_count=1, gpu_model="H100-80GB")
    assert (refused.value.status, refused.value.code) == (402, "payment_required")
    assert "credit" in refused.value.message.lower()
    assert await free(portal, "H100-80GB") == 1


async def test_activate_then_get_shows_it_active(portal: PortalClient) -> None:
    held = await portal.reserve(user="ann", server_name="", gpu_count=2, gpu_model="A100-80GB")
    assert (await portal.activate(held.id)).status == "active"
    seen = await portal.get(held.id)
    assert seen is not None and seen.status == "active" and seen.id == held.id
    assert await portal.get("no-such-reservation") is None


async def test_a_failed_start_releases_the_gpus_once(portal: PortalClient) -> None:
    held = await portal.reserve(user="ann", server_name="", gpu_count=2, gpu_model="A100-80GB")
    assert await portal.failed(held.id, "the server did not start") is True
    assert await portal.failed(held.id, "reported twice") is True  # idempotent
    seen = await portal.get(held.id)
    assert seen is not None and seen.status == "released"
    assert await free(portal, "A100-80GB") == 2
    assert await portal.failed("no-such-reservation", "x") is False


async def test_release_is_idempotent_and_an_unknown_one_is_gone(portal: PortalClient) -> None:
    held = await portal.reserve(user="ann", server_name="", gpu_count=1, gpu_model="A100-80GB")
    assert await portal.release(held.id) is True
    assert await portal.release(held.id) is True
    assert await free(portal, "A100-80GB") == 2
    assert await portal.release("no-such-reservation") is False
    with pytest.raises(PortalError) as refused:
        await portal.activate(held.id)
    assert refused.value.status == 409


async def test_a_wrong_token_is_401(base_url: str) -> None:
    stranger = PortalClient(base_url, "not-the-spawner", retries=1)
    try:
        with pytest.raises(PortalError) as refused:
            await stranger.offers()
        assert (refused.value.status, refused.value.code) == (401, "unauthenticated")
    finally:
        await stranger.close()
