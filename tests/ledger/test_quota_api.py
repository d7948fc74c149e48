"""PUT and GET /quotas through the portal app (SQLite and PostgreSQL): who may set and
read a quota, what a bad quota is told, and what the answer shows."""

from __future__ import annotations

from fastapi.testclient import TestClient

from . import test_billing_api as billing
from .test_billing_api import API, auth, error

# The billing API's fixtures: a portal app with the hub double and accounts made.
chain, portal, client = billing.chain, billing.portal, billing.client


def test_an_admin_sets_a_users_quota_and_the_user_reads_it(client: TestClient) -> None:
    body = {"user": "ann", "window": "week", "gpu_hours": 2.5, "spend_cap_per_hour": 5_000_000}
    put = client.put(f"{API}/quotas", json=body, headers=auth("tok-admin"))
    assert put.status_code == 200, put.text
    view = {
        "window": "week",
        "gpu_hours": 2.5,
        "gpu_hours_used": 0.0,
        "spend_cap_per_hour": 5_000_000,
    }
    assert put.json() == view
    assert client.get(f"{API}/quotas", headers=auth("tok-ann")).json() == view
    assert client.get(f"{API}/quotas?user=ann", headers=auth("tok-admin")).json() == view
    # Replacing it drops what the new quota leaves out.
    again = client.put(
        f"{API}/quotas", json={"user": "ann", "gpu_hours": 1}, headers=auth("tok-admin")
    )
    assert again.json() == {
        "window": "day",
        "gpu_hours": 1.0,
        "gpu_hours_used": 0.0,
        "spend_cap_per_hour": None,
    }


def test_a_user_without_a_quota_reads_null(client: TestClient) -> None:
    reply = client.get(f"{API}/quotas", headers=auth("tok-bob"))
    assert (reply.status_code, reply.json()) == (200, None)


def test_only_admins_set_quotas_and_users_read_only_their_own(client: TestClient) -> None:
    body = {"user": "ann", "gpu_hours": 1000}
    refused = client.put(f"{API}/quotas", json=body, headers=auth("tok-ann"))
    assert refused.status_code == 403
    assert error(refused) == "This needs the admin role; you are a customer."
    peek = client.get(f"{API}/quotas?user=ann", headers=auth("tok-bob"))
    assert peek.status_code == 403
    assert error(peek) == "You can only see your own usage, balance and servers."


def test_a_bad_quota_is_refused_with_a_sentence(client: TestClient) -> None:
    cases = [
        ({"user": "ann", "team": "ml", "gpu_hours": 1}, 400, "Name exactly one of user or team."),
        ({"gpu_hours": 1}, 400, "Name exactly one of user or team."),
        ({"user": "nobody", "gpu_hours": 1}, 404, "There is no hub user named 'nobody'"),
        ({"user": "ann", "gpu_hours": -1}, 422, "gpu_hours:"),
        ({"user": "ann", "window": "year"}, 422, "window:"),
        ({"user": "ann", "spend_cap_per_hour": 1.5}, 422, "spend_cap_per_hour:"),
    ]
    for body, status, message in cases:
        reply = client.put(f"{API}/quotas", json=body, headers=auth("tok-admin"))
        assert reply.status_code == status, (body, reply.text)
        assert error(reply).startswith(message), (body, error(reply))
        assert "Traceback" not in reply.text
