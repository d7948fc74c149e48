"""The admin control panel's hub pages (``/hub/portal-admin``): the forms' rules alone,
then the pages through the real hub and portal of the shared stack (no browser):
an admin reads every section and acts through a form (audited); a customer gets 403
from every page and every action, whatever they post."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from gpuportal.hub.pages.admin import action_request

from .portal_stack import Stack, hub_login, hub_token

PORTAL = "/services/portal/api/v1"
SECTIONS = ["", "/accounts", "/allocations", "/payouts", "/audit"]


@pytest.mark.parametrize(
    ("form", "call"),
    [
        (
            {"action": "block", "target": "node-a", "reason": "bad"},
            ("POST", "admin/nodes/node-a/block", {"reason": "bad"}),
        ),
        (
            {"action": "list", "target": "3"},
            ("POST", "admin/providers/3/delist?listed=true", {"reason": ""}),
        ),
        (
            {"action": "refund", "target": "7", "amount": "0.5", "reason": "lost"},
            ("POST", "admin/allocations/7/refund", {"reason": "lost", "amount": 500_000}),
        ),
        (
            {"action": "grant", "kind": "team", "target": "ml", "amount": "10", "reason": "x"},
            ("POST", "credits/grants", {"team": "ml", "amount": 10_000_000, "memo": "x"}),
        ),
        ({"action": "retry", "target": "12"}, ("POST", "payouts/12/retry", {})),
        ({"action": "run", "target": "round"}, ("POST", "payouts/run", {})),
    ],
)
def test_each_form_makes_one_portal_call(form: dict[str, str], call: tuple[Any, ...]) -> None:
    assert action_request(form)[:3] == call


@pytest.mark.parametrize(
    ("form", "words"),
    [
        ({"action": "block", "target": "../../credits/grants"}, "node id is"),
        ({"action": "block", "target": ".."}, "node id is"),
        ({"action": "delist", "target": "1/../x"}, "by its number"),
        ({"action": "refund", "target": "7", "amount": "1"}, "Say why"),
        ({"action": "refund", "target": "7", "amount": "1e3", "reason": "x"}, "not an amount"),
        ({"action": "grant", "target": "ann", "amount": "-1"}, "more than zero"),
        ({"action": "grant", "target": "ann", "amount": ""}, "how many credits"),
        ({"action": "grant", "target": "ann", "kind": "admin", "amount": "1"}, "user or a team"),
        ({"action": "quota", "target": "ann", "gpu_hours": "lots"}, "not a number"),
        ({"action": "delete-everything", "target": "ann"}, "no such action"),
        ({"action": "retry", "target": "12/../../run"}, "payout is named by its number"),
        ({"action": "grant", "target": " "}, "what to act on"),
    ],
)
def test_a_bad_form_is_refused_with_a_sentence(form: dict[str, str], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        action_request(form)


@pytest.mark.slow
@pytest.mark.ray
def test_the_admin_panel_for_admins_only_through_the_real_hub(stack: Stack) -> None:
    crafted = "<b>mallory<b>"
    customer = hub_login(stack.base_url, crafted, "pw-mallory-12345")
    admin = hub_login(stack.base_url, "admin", stack.admin_password)
    try:
        # A customer: 403 from every page and every action, even a well-formed post.
        for section in SECTIONS:
            assert customer.get(f"/hub/portal-admin{section}").status_code == 403
        form = {"action": "grant", "target": crafted, "amount": "100", "reason": "me"}
        form["_xsrf"] = customer.cookies.get("_xsrf", path="/hub/") or ""
        assert customer.post("/hub/portal-admin/act", data=form).status_code == 403
        assert "gp-nav-portal-admin" not in customer.get("/hub/home").text
        # With the customer's own API token, the portal's admin API refuses too.
        token = hub_token(customer, crafted)
        for path in ("admin/audit", "admin/accounts", "admin/allocations", "admin/nodes"):
            reply = httpx.get(
                f"{stack.base_url}{PORTAL}/{path}", headers={"Authorization": f"token {token}"}
            )
            assert reply.status_code == 403, (path, reply.text)

        # An admin: the link, every section, and an action through a form.
        assert "gp-nav-portal-admin" in admin.get("/hub/home").text
        for section in SECTIONS:
            page = admin.get(f"/hub/portal-admin{section}")
            assert page.status_code == 200, (section, page.text[:500])
            assert 'id="gp-admin-error"' not in page.text, page.text
        xsrf = admin.cookies.get("_xsrf", path="/hub/") or ""
        grant = {"action": "grant", "kind": "user", "target": crafted, "amount": "2.5"}
        done = admin.post(
            "/hub/portal-admin/act",
            data={**grant, "reason": "<b>hi</b>", "back": "accounts", "_xsrf": xsrf},
        )
        assert done.status_code == 200 and "/hub/portal-admin/accounts" in str(done.url)
        assert 'id="gp-admin-done"' in done.text, done.text
        # The crafted name and reason are text, never markup.
        assert "&lt;b&gt;mallory&lt;b&gt;" in done.text and "<b>mallory<b>" not in done.text
        log = admin.get("/hub/portal-admin/audit", params={"action": "credits.grant"}).text
        assert "&lt;b&gt;hi&lt;/b&gt;" in log and "<b>hi</b>" not in log
        refused = admin.post(
            "/hub/portal-admin/act",
            data={"action": "refund", "target": "999999", "reason": "x", "_xsrf": xsrf},
        )
        assert 'id="gp-admin-failed"' in refused.text and "no allocation 999999" in refused.text
        # Payouts: a round run from the panel, in the audit log.
        ran = admin.post(
            "/hub/portal-admin/act",
            data={"action": "run", "target": "round", "back": "payouts", "_xsrf": xsrf},
        )
        assert "/hub/portal-admin/payouts" in str(ran.url) and 'id="gp-admin-payouts"' in ran.text
        assert 'id="gp-admin-done"' in ran.text, ran.text[-2000:]
        log = admin.get("/hub/portal-admin/audit", params={"action": "payout."}).text
        assert "payout.run" in log
        no_xsrf = admin.post("/hub/portal-admin/act", data=grant)
        assert no_xsrf.status_code == 403
    finally:
        customer.close()
        admin.close()
