"""Reservation answers carry no internal URL for customers (issue 8, item 4).

The Jobs API URL, the cluster id and the node's Ray resource tell a customer
where the provider's Ray cluster listens; only the spawner (a trusted hub
service) needs them to submit the server's job. Every route that answers with
a reservation is checked for both kinds of caller, through the real portal app.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from .conftest import Market
from .test_reservation_billing import API, PRICE, client_for

INTERNAL = {"jobs_url", "cluster_id", "node_resource"}
JOBS_URL = "http://127.0.0.1:8265"


@pytest.fixture
def client(tmp_path: Path, db_url: str, market: Market) -> Iterator[TestClient]:
    market.add_node(
        "prov", "node-p", {"A100-80GB": 2}, price=PRICE, region="local", jobs_url=JOBS_URL
    )
    yield from client_for(tmp_path, db_url)


def call(client: TestClient, token: str, method: str, path: str, **kw: Any) -> Any:
    reply = client.request(
        method, f"{API}{path}", headers={"Authorization": f"token {token}"}, **kw
    )
    assert reply.status_code in (200, 201), reply.text
    return reply.json()


def test_a_customer_never_sees_the_jobs_url_or_the_cluster(client: TestClient) -> None:
    made = call(client, "tok-ann", "POST", "/reservations", json={"user": "ann", "gpu_count": 1})
    rid = made["id"]
    answers = [
        made,
        call(client, "tok-ann", "POST", "/reservations", json={"user": "ann", "gpu_count": 1}),
        call(client, "tok-ann", "GET", f"/reservations/{rid}"),
        *call(client, "tok-ann", "GET", "/reservations"),
        call(client, "tok-ann", "POST", f"/reservations/{rid}/activate"),
        call(client, "tok-ann", "DELETE", f"/reservations/{rid}"),
    ]
    for answer in answers:
        assert answer["id"] == rid and answer["node_id"] == "node-p"
        assert not INTERNAL & answer.keys(), answer
        assert JOBS_URL not in json.dumps(answer)
    offers = call(client, "tok-ann", "GET", "/offers")
    assert offers and "127.0.0.1" not in json.dumps(offers)


def test_an_admin_is_answered_as_a_customer_is(client: TestClient) -> None:
    made = call(client, "tok-ann", "POST", "/reservations", json={"user": "ann", "gpu_count": 1})
    seen = call(client, "tok-admin", "GET", f"/reservations/{made['id']}")
    assert not INTERNAL & seen.keys()


def test_the_spawner_gets_what_it_needs_to_submit_the_job(client: TestClient) -> None:
    made = call(
        client, "tok-spawner", "POST", "/reservations", json={"user": "ann", "gpu_count": 1}
    )
    rid = made["id"]
    answers = [
        made,
        call(client, "tok-spawner", "GET", f"/reservations/{rid}"),
        *call(client, "tok-spawner", "GET", "/reservations?user=ann"),
        call(client, "tok-spawner", "POST", f"/reservations/{rid}/activate"),
        call(client, "tok-spawner", "DELETE", f"/reservations/{rid}"),
    ]
    for answer in answers:
        assert answer["jobs_url"] == JOBS_URL
        assert answer["node_resource"] == "gpuportal/node:node-p"
        assert isinstance(answer["cluster_id"], int)
    # And the spawner's own parser accepts it.
    from gpuportal.spawners.portal_client import Reservation

    parsed = Reservation.from_json(made)
    assert (parsed.jobs_url, parsed.node_resource) == (JOBS_URL, "gpuportal/node:node-p")
