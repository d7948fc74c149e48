"""The spawner contract through a real hub on real Ray nodes (logical GPUs)."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import httpx
import pytest
from ray.job_submission import JobSubmissionClient

from gpuportal.spawners.rayjobs import JobNotFound, RayJobs, RayUnavailable

from .conftest import Hub
from .contract_portal import ContractPortal, Node
from .kernel import run_code
from .raynodes import RayNodes

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def read_progress(hub: Hub, user: str, events: list[dict[str, Any]]) -> None:
    """Collect the progress event stream (server-sent events) until ready or failed."""
    url = f"{hub.url}/hub/api/users/{user}/server/progress"
    with httpx.stream(
        "GET", url, headers={"Authorization": f"token {hub.token}"}, timeout=90
    ) as reply:
        for line in reply.iter_lines():
            if line.startswith("data:"):
                event = json.loads(line[5:])
                events.append(event)
                if event.get("ready") or event.get("failed") or len(events) > 50:
                    return


def test_gpu_server_lifecycle(hub: Hub, ray_nodes: RayNodes, portal: ContractPortal) -> None:
    hub.api("POST", "/users/alice")
    events: list[dict[str, Any]] = []
    replies: list[httpx.Response] = []
    spawn = threading.Thread(
        target=lambda: replies.append(
            hub.spawn("alice", options={"profile": "gpu", "gpu_model": "A100-80GB", "gpu_count": 1})
        )
    )
    spawn.start()
    # The progress stream exists once the spawn is pending.
    for _ in range(100):
        model = hub.server_model("alice")
        if model and model.get("pending"):
            break
        threading.Event().wait(0.05)
    read_progress(hub, "alice", events)
    spawn.join(90)
    assert replies and replies[0].status_code in (201, 202), replies and replies[0].text
    hub.wait_ready("alice")
    messages = [e.get("message", "") for e in events]
    for step in (
        "Reserved 1x A100-80GB",
        "Submitted Ray job",
        "Scheduled on Ray node",
        "Server ready",
    ):
        assert any(step in m for m in messages), messages
    assert events[-1].get("ready") is True

    state = hub.state("alice")
    assert set(state) >= {"jobs_url", "job_id", "reservation_id", "url", "node_id", "gpus"}
    jobs = JobSubmissionClient(ray_nodes.jobs_url, headers=ray_nodes.headers)
    info = jobs.get_job_info(state["job_id"])
    assert str(info.status) == "RUNNING"
    # Pinned to the reserved node, holding one of its GPUs.
    assert info.driver_node_id == ray_nodes.ray_node_id("n1")
    env = info.runtime_env["env_vars"]
    assert all(k.startswith(("JUPYTERHUB_", "GPUPORTAL_SINGLEUSER_")) for k in env), env
    assert "hub-secret" not in repr(info.runtime_env)
    assert "LEAKY_SECRET" not in env
    # The server's hub token is not published in the job: the wrapper claimed it once.
    assert not {"JUPYTERHUB_API_TOKEN", "JPY_API_TOKEN"} & set(env)
    assert "GPUPORTAL_SINGLEUSER_CLAIM" in env
    assert portal.reservations[state["reservation_id"]]["status"] == "active"

    # Inside the server (a process of the Ray job), a kernel sees exactly the job's GPU.
    out = run_code(
        f"{hub.url}/user/alice/",
        hub.token,
        "import os; print(os.environ.get('CUDA_VISIBLE_DEVICES'), "
        "os.environ.get('JUPYTERHUB_USER'), 'LEAKY_SECRET' in os.environ)",
    )
    visible, user, leaked = out.split()
    assert visible == state["gpus"] and len(visible.split(",")) == 1
    assert visible in {"0", "1"}
    assert (user, leaked) == ("alice", "False")

    hub.stop_server("alice")
    assert str(jobs.get_job_info(state["job_id"]).status) == "STOPPED"
    assert portal.reservations[state["reservation_id"]]["status"] == "released"
    # Stopping again is harmless.
    again = hub.api("DELETE", hub.server_path("alice"))
    assert again.status_code in (204, 400, 404), again.text
    assert hub.server_model("alice") is None


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"profile": "tpu"}, "There is no profile 'tpu'"),
        ({"profile": "gpu", "gpu_count": 3}, "'3' is not a valid GPUs"),
        ({"profile": "gpu", "gpu_model": "<script>"}, "is not a valid GPU model"),
        ({"profile": "gpu", "image": "evil/image"}, "does not take image"),
        ({"profile": "gpu", "max_price": "cheap"}, "is not a valid Max price"),
        ({"profile": "cpu", "gpu_count": 1}, "does not take gpu_count"),
        ({"profile": ["gpu"]}, "profile must be a string or a number"),
    ],
)
def test_invalid_options_are_refused_with_a_sentence(
    hub: Hub, portal: ContractPortal, options: dict[str, Any], fragment: str
) -> None:
    before = len(portal.reservations)
    reply = hub.spawn("olga", options=options)
    assert reply.status_code == 400, reply.text
    assert fragment in reply.json()["message"]
    assert "Traceback" not in reply.text
    assert len(portal.reservations) == before
    assert hub.server_model("olga") is None


def test_report_endpoint_needs_a_server_token(hub: Hub) -> None:
    url = f"{hub.url}/hub/api/gpuportal/report"
    body = {"job_id": "x", "port": 1234}
    anonymous = httpx.post(url, json=body, timeout=10)
    assert anonymous.status_code == 403
    as_service = httpx.post(
        url, json=body, headers={"Authorization": f"token {hub.token}"}, timeout=10
    )
    assert as_service.status_code == 403
    assert "Only a user server's own token can report." in as_service.json()["message"]


def test_the_jobs_api_refuses_whoever_lacks_the_clusters_token(ray_nodes: RayNodes) -> None:
    """The cluster runs with Ray's token auth: without the token nobody lists jobs
    (and reads their runtime envs) or submits one; the spawner's client has it."""
    listed = httpx.get(f"{ray_nodes.jobs_url}/api/jobs/", timeout=30)
    assert listed.status_code == 401, listed.text
    submitted = httpx.post(
        f"{ray_nodes.jobs_url}/api/jobs/",
        json={"entrypoint": "echo unbilled", "entrypoint_num_gpus": 1},
        timeout=30,
    )
    assert submitted.status_code == 401, submitted.text
    wrong = httpx.get(
        f"{ray_nodes.jobs_url}/api/jobs/", headers={"Authorization": "Bearer guess"}, timeout=30
    )
    assert wrong.status_code in (401, 403), wrong.text
    with pytest.raises(RayUnavailable):
        asyncio.run(RayJobs(ray_nodes.jobs_url).state("no-such-job"))
    trusted = RayJobs(ray_nodes.jobs_url, token=ray_nodes.token)
    assert asyncio.run(trusted.stop("no-such-job")) is False  # authenticated; job unknown


def test_polls_reuse_one_jobs_client_and_one_http_client_per_cluster(
    ray_nodes: RayNodes,
) -> None:
    """Each new SDK client asks the cluster for its version first; a poll must not."""
    jobs = RayJobs(ray_nodes.jobs_url, token=ray_nodes.token)

    async def poll_three_times() -> None:
        for _ in range(3):
            with pytest.raises(JobNotFound):
                await jobs.state("gpuportal--nobody--never-submitted")
            assert await jobs.node_alive("f" * 56) is False

    asyncio.run(poll_three_times())
    assert (jobs.sdk_clients_made, jobs._http.made) == (1, 1)


# --- the spawn form in Chromium, against the real hub -------------------------------------

HOSTILE_MODEL = '<img src=x onerror="window.pwned=1">'
HOSTILE_REGION = 'x"><script>window.pwned=2</script>'


def log_in(page: Any, hub: Hub, name: str) -> None:
    page.goto(f"{hub.url}/hub/login")
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", "any-password")
    page.click("input[type=submit], button[type=submit]")
    page.wait_for_url("**/hub/**", timeout=30_000)


def selected_value(page: Any, field: str) -> str:
    return str(page.eval_on_selector(f"select[name='{field}']", "s => s.value"))


@pytest.mark.browser
def test_the_form_in_chromium_offers_what_can_be_placed_and_escapes_provider_names(
    hub: Hub, portal: ContractPortal, browser_page: Any
) -> None:
    """CPU by default; disabled models and counts; the portal's own minimum period
    (10 minutes here, not a hard-coded 15); a provider's hostile names stay text."""
    hostile = Node("evil", 1, HOSTILE_MODEL, HOSTILE_REGION, 500_000, "http://127.0.0.1:9")
    portal.nodes.append(hostile)
    portal.min_billable_seconds = 600
    try:
        page = browser_page
        log_in(page, hub, "uma")
        page.goto(f"{hub.url}/hub/spawn")
        assert page.is_checked("input[name=profile][value=cpu]")
        assert page.evaluate("window.pwned") is None
        models = page.locator("select[name='profile-option-gpu--gpu_model'] option")
        texts = models.all_inner_texts()
        assert f"{HOSTILE_MODEL} (this name cannot be chosen)" in texts
        assert "NVIDIA H100 80GB (no offers now)" in texts
        assert page.is_disabled("select[name='profile-option-gpu--gpu_model'] option[value=L4]")
        regions = page.locator("select[name='profile-option-gpu--region'] option")
        assert f"{HOSTILE_REGION} (this name cannot be chosen)" in regions.all_inner_texts()
        assert page.inner_text("#gpuportal-balance") == "10.00 credits"
        assert page.inner_text("#gpuportal-min-billable") == "10 minutes"
        assert page.is_visible("#gpuportal-demo")
        page.check("input[name=profile][value=gpu]")
        page.select_option("select[name='profile-option-gpu--gpu_model']", "A100-80GB")
        count = "select[name='profile-option-gpu--gpu_count']"
        assert page.is_disabled(f"{count} option[value='4']")  # n1 has 2 GPUs
        page.select_option(count, "2")
        assert page.inner_text("#gpuportal-cost-gpu") == (
            "About 3.00 credits per hour; at least 0.50 credits (10 minutes) once it starts."
        )
        assert page.evaluate("window.pwned") is None
    finally:
        portal.nodes.remove(hostile)
        portal.min_billable_seconds = 900


@pytest.mark.browser
def test_a_refusal_in_chromium_is_a_sentence_that_keeps_the_form_and_drops_the_choice(
    hub: Hub, portal: ContractPortal, browser_page: Any
) -> None:
    portal.balances["vic"] = 0
    before = len(portal.reservations)
    try:
        page = browser_page
        log_in(page, hub, "vic")
        page.goto(f"{hub.url}/hub/spawn")
        page.check("input[name=profile][value=gpu]")
        page.select_option("select[name='profile-option-gpu--gpu_model']", "A100-80GB")
        page.click("#spawn_form button[type=submit]")
        page.wait_for_selector(".spawn-error-msg", timeout=60_000)
        error = page.inner_text(".spawn-error-msg")
        assert "add credits" in error, error
        assert "SpawnException" not in error and "402" not in error and "reason=" not in error
        refusal = page.inner_text("#gpuportal-refusal")
        assert "choices were reset" in refusal
        link = page.get_attribute("#gpuportal-refusal a", "href")
        assert link == "/services/portal/docs#/billing"
        # The form is there and usable, at the refused profile without the refused model.
        assert page.is_checked("input[name=profile][value=gpu]")
        assert selected_value(page, "profile-option-gpu--gpu_model") == "any"
        assert page.is_enabled("#spawn_form button[type=submit]")
        assert len(portal.reservations) == before
        assert hub.server_model("vic") is None
    finally:
        del portal.balances["vic"]
