"""Pure logic of the spawner package: names, profiles, the form, state, reports, env."""

from __future__ import annotations

import asyncio
import tomllib
from pathlib import Path
from typing import Any

import pytest
from jupyterhub.spawner import SpawnException

from gpuportal.provider.money import format_credits
from gpuportal.spawners import form, naming, profiles, report
from gpuportal.spawners import spawner as spawner_module
from gpuportal.spawners.portal_client import Balance, PortalClient, PortalError
from gpuportal.spawners.profiles import default_profile_list
from gpuportal.spawners.refusals import SpawnRefusal
from gpuportal.spawners.spawner import STATE_VERSION, STATE_VERSION_KEY, RaySpawner

from .contract_portal import ContractPortal, Node, Served, create_app
from .raynodes import free_port

PROFILES = profiles.check_profile_list(default_profile_list(models=["RTX-4090"]))

# --- names ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (("a-b", ""), ("a", "b")),
        (("a", "b-c"), ("a-b", "c")),
        (("a--b", ""), ("a", "-b")),
        (("user-has-dash", ""), ("user-has", "dash")),
        (("x_2d_", ""), ("x-", "")),
        (("Ü", ""), ("ü", "")),
        (("a" * 300, "x"), ("a" * 300, "y")),
        (("a" * 300, ""), ("a" * 299, "a")),
    ],
)
def test_server_keys_never_collide(a: tuple[str, str], b: tuple[str, str]) -> None:
    assert naming.server_key(*a) != naming.server_key(*b)
    assert naming.oauth_client_id(*a) != naming.oauth_client_id(*b)


@pytest.mark.parametrize("name", ["a-b", "ünï-çødé", "x_y", "🙂", "A B/C", "", "a" * 255])
def test_escape_round_trips_and_is_ray_safe(name: str) -> None:
    escaped = naming.escape(name)
    assert naming.unescape(escaped) == name
    assert set(escaped) <= set("abcdefghijklmnopqrstuvwxyz0123456789_")
    job = naming.job_submission_id(name, "srv")
    assert set(job) <= set("abcdefghijklmnopqrstuvwxyz0123456789_-")
    assert len(job) <= 120


def test_job_ids_are_fresh_per_spawn() -> None:
    assert naming.job_submission_id("a", "") != naming.job_submission_id("a", "")


# --- profiles and user options --------------------------------------------------------


def test_empty_options_select_the_free_cpu_profile() -> None:
    chosen = profiles.select(PROFILES, {})
    assert (chosen.profile, chosen.choices, chosen.overrides) == ("cpu", {}, {"gpu_count": 0})


def test_the_gpu_profile_alone_selects_its_default_choices() -> None:
    chosen = profiles.select(PROFILES, {"profile": "gpu"})
    assert chosen.profile == "gpu"
    assert chosen.choices == {
        "gpu_model": "any",
        "gpu_count": "1",
        "region": "any",
        "max_price": "any",
    }
    assert chosen.overrides == {"gpu_model": "", "gpu_count": 1, "region": "", "max_price": ""}


def test_rest_options_with_numbers_and_unlisted_choices() -> None:
    chosen = profiles.select(
        PROFILES,
        {
            "profile": "gpu",
            "gpu_model": "RTX-4090",
            "gpu_count": 2,
            "region": "eu-west",
            "max_price": 2.5,
        },
    )
    assert chosen.overrides == {
        "gpu_model": "RTX-4090",
        "gpu_count": 2,
        "region": "eu-west",
        "max_price": "2.5",
    }


def test_cpu_profile_has_no_gpu() -> None:
    assert profiles.select(PROFILES, {"profile": "cpu"}).overrides == {"gpu_count": 0}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ([], "Server options must be a JSON object."),
        ({"profile": "x"}, "There is no profile 'x'; choose one of: cpu, gpu."),
        ({"profile": "gpu", "gpu_count": True}, "gpu_count must be a string or a number."),
        (
            {"profile": "gpu", "gpu_count": "16"},
            "'16' is not a valid GPUs; choose one of: 1, 2, 4, 8.",
        ),
        (
            {"profile": "gpu", "region": "EU WEST"},
            "'EU WEST' is not a valid Region: use letters, digits, dots, dashes and "
            "underscores, as the marketplace names regions.",
        ),
        (
            {"profile": "gpu", "gpu_model": "A\x00"},
            "'A\\x00' is not a valid GPU model: name a GPU model the marketplace lists.",
        ),
        (
            {"profile": "gpu", "env": {"A": "b"}},
            "The gpu profile does not take env; it accepts: gpu_model, "
            "gpu_count, region, max_price.",
        ),
        (
            {"gpu_count": "1"},
            "The cpu profile does not take gpu_count; it accepts: no options.",
        ),
        (
            {"profile": "cpu", "region": "x"},
            "The cpu profile does not take region; it accepts: no options.",
        ),
    ],
)
def test_invalid_options(options: Any, message: str) -> None:
    with pytest.raises(profiles.InvalidOptions) as caught:
        profiles.select(PROFILES, options)
    assert str(caught.value) == message


def test_form_fields_become_flat_options_for_the_chosen_profile_only() -> None:
    data = {
        "profile": ["gpu"],
        "profile-option-gpu--gpu_count": ["2"],
        "profile-option-gpu--region": ["unlisted-choice"],
        "profile-option-gpu--region--unlisted-choice": ["us-east"],
        "profile-option-cpu--ignored": ["x"],
        "junk": ["y"],
    }
    assert profiles.options_from_form(data) == {
        "profile": "gpu",
        "gpu_count": "2",
        "region": "us-east",
    }
    assert profiles.options_from_form({}) == {}


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ([{"slug": "x"}], "profile #1 needs a display_name"),
        ([{"display_name": "A"}, {"display_name": "A"}], "two profiles have the slug 'a'"),
        (
            [{"display_name": "A", "default": True}, {"display_name": "B", "default": True}],
            "more than one profile is marked default",
        ),
        (
            [{"display_name": "A", "profile_options": {"o": {"choices": {}}}}],
            "profile 'a' option 'o' has no choices and no unlisted_choice",
        ),
    ],
)
def test_bad_profile_lists_fail_at_start(bad: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(profiles.InvalidProfileList) as caught:
        profiles.check_profile_list(bad)
    assert str(caught.value) == message


# --- the form --------------------------------------------------------------------------


def test_form_shows_offers_and_escapes_everything() -> None:
    hostile = [
        {
            "display_name": "<b>x</b>",
            "slug": "x",
            "description": "<script>",
            "profile_options": {
                "gpu_model": {
                    "display_name": "M",
                    "choices": {"A100-80GB": {"display_name": "A100"}},
                },
                "gpu_count": {"display_name": "N", "choices": {"1": {}}},
            },
        }
    ]
    offers = [
        {"gpu_model": "A100-80GB", "free_gpus": 3, "price_per_gpu_hour": 2_000_000},
        {"gpu_model": "A100-80GB", "free_gpus": 1, "price_per_gpu_hour": 1_500_000},
        {"gpu_model": "<img>", "free_gpus": "x"},
    ]
    html = form.render(profiles.check_profile_list(hostile), offers)
    assert html.count("<script>") == 1  # the form's own script, and no other
    assert "&lt;b&gt;x&lt;/b&gt;" in html and "&lt;script&gt;" in html
    assert "A100 (4 free, from 1.50/GPU-hour)" in html
    assert "<img>" not in html


def test_form_without_marketplace_says_so() -> None:
    html = form.render(PROFILES, None)
    assert "availability unknown" in html and "not available right now" in html


@pytest.mark.parametrize(
    ("micro", "text"), [(0, "0.00"), (1_500_000, "1.50"), (1_234_567, "1.23"), (-10_000, "-0.01")]
)
def test_format_credits(micro: int, text: str) -> None:
    assert format_credits(micro) == text


# --- the spawner object --------------------------------------------------------------


class FakeUser:
    name = "a-b"
    url = "/user/a-b/"


def make_spawner(**config: Any) -> RaySpawner:
    spawner = RaySpawner(user=FakeUser(), **config)  # type: ignore[arg-type]
    return spawner


def test_state_round_trip_and_clear() -> None:
    spawner = make_spawner()
    spawner.job_id, spawner.jobs_url, spawner.reservation_id = "j", "http://r", "res"
    spawner.url, spawner.node_id, spawner.ray_node_id, spawner.gpus = "http://h:1", "n", "rn", "0"
    spawner.cluster_id = "c"
    state = spawner.get_state()
    assert {
        k: state[k]
        for k in (
            "job_id",
            "jobs_url",
            "reservation_id",
            "url",
            "node_id",
            "ray_node_id",
            "gpus",
            "cluster_id",
        )
    } == {
        "job_id": "j",
        "jobs_url": "http://r",
        "reservation_id": "res",
        "url": "http://h:1",
        "node_id": "n",
        "ray_node_id": "rn",
        "gpus": "0",
        "cluster_id": "c",
    }
    fresh = make_spawner()
    fresh.load_state(state)
    assert fresh.get_state() == state
    fresh.clear_state()
    assert not any(getattr(fresh, k) for k in ("job_id", "reservation_id", "url"))
    assert asyncio.run(fresh.poll()) == 0


def test_oauth_client_id_is_collision_free() -> None:
    assert make_spawner().oauth_client_id == naming.oauth_client_id("a-b", "")


def test_options_are_applied_and_undone_between_spawns() -> None:
    spawner = make_spawner(profile_list=default_profile_list())
    spawner.user_options = {"profile": "gpu", "gpu_count": 4, "max_price": "2.5"}
    spawner._apply_options()
    assert (spawner.gpu_count, spawner.max_price_micro) == (4, 2_500_000)
    spawner.user_options = {"profile": "cpu"}
    spawner._apply_options()
    assert (spawner.gpu_count, spawner.max_price) == (0, "")
    spawner.user_options = {"profile": "gpu", "gpu_count": 3}
    with pytest.raises(SpawnException) as caught:
        spawner._apply_options()
    assert caught.value.status_code == 400
    assert "'3' is not a valid GPUs" in caught.value.message


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"job_id": "other", "port": 8888}, "The report names another job."),
        ({"job_id": "j1", "port": 0}, "port must be an integer between 1 and 65535."),
        ({"job_id": "j1", "port": True}, "port must be an integer between 1 and 65535."),
        ({"job_id": "j1", "port": "8888"}, "port must be an integer between 1 and 65535."),
        (
            {"job_id": "j1", "port": 8888, "gpus": "0;rm -rf"},
            "gpus must be a CUDA_VISIBLE_DEVICES value.",
        ),
    ],
)
def test_reports_are_checked(body: dict[str, Any], message: str) -> None:
    async def run() -> None:
        spawner = make_spawner()
        spawner.job_id = "j1"
        spawner._report = asyncio.get_running_loop().create_future()
        with pytest.raises(ValueError, match="^" + message.replace("(", r"\(")):
            spawner.accept_report(body)
        spawner.accept_report({"job_id": "j1", "port": 8888, "gpus": "0,1"})
        assert spawner._report.result() == (8888, "0,1")
        with pytest.raises(ValueError, match="not waiting"):
            spawner.accept_report({"job_id": "j1", "port": 8888})

    asyncio.run(run())


def test_no_report_accepted_when_not_starting() -> None:
    with pytest.raises(ValueError, match="not waiting"):
        make_spawner().accept_report({"job_id": "", "port": 1})


@pytest.mark.parametrize("price", ["0", "-1", "abc", "1.0000001", "10000000"])
def test_bad_max_price_is_refused(price: str) -> None:
    with pytest.raises(Exception, match="price"):
        make_spawner(max_price=price)


# --- the portal client against the marketplace contract --------------------------------


def test_portal_client_reserve_refuse_release() -> None:
    portal = ContractPortal(token="t0k3n")
    portal.nodes.append(Node("n9", 1, "L4", "eu", 700_000, "http://ray"))
    port = free_port()

    async def run() -> None:
        client = PortalClient(f"http://127.0.0.1:{port}/services/portal", "t0k3n", timeout=5)
        offers = await client.offers()
        assert offers[0]["free_gpus"] == 1
        held = await client.reserve(user="u", server_name="", gpu_count=1, gpu_model="L4")
        assert (held.node_resource, held.gpu_indices, held.status) == (
            "gpuportal/node:n9",
            [0],
            "held",
        )
        with pytest.raises(PortalError) as caught:
            await client.reserve(user="v", server_name="", gpu_count=1)
        assert (caught.value.status, caught.value.code) == (409, "no_capacity")
        assert "No 1x GPU free" in caught.value.message
        assert (await client.activate(held.id)).status == "active"
        assert await client.release(held.id) is True
        assert await client.release("missing") is False
        bad = PortalClient(f"http://127.0.0.1:{port}/services/portal", "wrong", timeout=5)
        with pytest.raises(PortalError) as caught:
            await bad.offers()
        assert caught.value.status == 401
        await client.close()
        await bad.close()

    with Served(create_app(portal), port):
        asyncio.run(run())


def test_query_options_are_flat_text() -> None:
    spawner = make_spawner()
    assert spawner.options_from_query(
        {"profile": ["gpu"], "gpu_count": [b"2"], "junk": [], "n": 3}
    ) == {"profile": "gpu", "gpu_count": "2"}
    assert profiles.options_from_form({"profile": "cpu"}) == {"profile": "cpu"}  # type: ignore[dict-item]


# --- the spawner as JupyterHub and KubeSpawner write theirs ----------------------------


def test_state_carries_its_version_and_reads_states_without_one() -> None:
    spawner = make_spawner()
    assert spawner.get_state() == {}  # nothing running: nothing to version
    spawner.job_id, spawner.jobs_url = "j", "http://r"
    state = spawner.get_state()
    assert state[STATE_VERSION_KEY] == STATE_VERSION
    old = {k: v for k, v in state.items() if k != STATE_VERSION_KEY}  # a version-0 state
    fresh = make_spawner()
    fresh.load_state(old)
    assert (fresh.job_id, fresh.jobs_url) == ("j", "http://r")
    assert fresh.get_state() == state


def test_a_state_from_a_newer_spawner_is_read_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fresh = make_spawner()
    with caplog.at_level("WARNING"):
        fresh.load_state({"job_id": "j", STATE_VERSION_KEY: STATE_VERSION + 1})
    assert fresh.job_id == "j"
    assert "newer" in caplog.text


def test_progress_follows_the_start_events_for_every_reader() -> None:
    async def run() -> None:
        spawner = make_spawner(start_timeout=30)
        spawner._start_done = False
        readers = [spawner.progress(), spawner.progress()]
        spawner._emit(10, "Reserved")
        for reader in readers:
            event = await asyncio.wait_for(reader.__anext__(), timeout=10)
            assert event == {"progress": 10, "message": "Reserved"}
        # A reader waiting for the next event is woken by it, not by a timer.
        pending = [asyncio.ensure_future(reader.__anext__()) for reader in readers]
        await asyncio.sleep(0)
        assert not any(p.done() for p in pending)
        spawner._emit(30, "Submitted")
        for p in pending:
            assert (await asyncio.wait_for(p, timeout=10))["message"] == "Submitted"
        spawner._start_done = True
        spawner._wake_progress()
        for reader in readers:
            with pytest.raises(StopAsyncIteration):
                await asyncio.wait_for(reader.__anext__(), timeout=10)

    asyncio.run(run())


def test_progress_after_the_start_yields_what_happened_and_ends() -> None:
    async def run() -> list[dict[str, Any]]:
        spawner = make_spawner()
        spawner._events = [{"progress": 10, "message": "a"}, {"progress": 90, "message": "b"}]
        return [e async for e in spawner.progress()]

    assert [e["message"] for e in asyncio.run(run())] == ["a", "b"]


def test_spawners_share_one_portal_client_and_never_key_it_by_the_token() -> None:
    a, b = make_spawner(portal_token="s3cret-token"), make_spawner(portal_token="s3cret-token")
    assert a.portal is b.portal
    assert make_spawner(portal_token="other").portal is not a.portal
    assert not any("s3cret-token" in str(key) for key in spawner_module._PORTAL_CLIENTS)
    assert not any("s3cret-token" in str(key) for key in spawner_module._JOBS_CLIENTS)


def test_portal_calls_reuse_one_http_client_per_event_loop() -> None:
    portal = ContractPortal(token="t0k3n")
    portal.nodes.append(Node("n9", 1, "L4", "eu", 700_000, "http://ray"))
    port = free_port()
    client = PortalClient(f"http://127.0.0.1:{port}/services/portal", "t0k3n", timeout=5)

    async def poll_offers() -> None:
        for _ in range(3):
            await client.offers()

    with Served(create_app(portal), port):
        asyncio.run(poll_offers())
        assert client._http.made == 1
        asyncio.run(poll_offers())  # a new loop needs its own client
        assert client._http.made == 2


def test_the_report_handlers_are_registered_once() -> None:
    from jupyterhub.apihandlers import default_handlers

    report.register()
    report.register()
    paths = [entry[0] for entry in default_handlers]
    assert paths.count(report.HANDLER_PATH) == 1
    assert paths.count(report.CLAIM_HANDLER_PATH) == 1


def test_the_form_template_ships_with_the_package() -> None:
    assert (form.TEMPLATES / "spawn_form.html").is_file()
    with open(Path(__file__).resolve().parents[2] / "pyproject.toml", "rb") as f:
        package_data = tomllib.load(f)["tool"]["setuptools"]["package-data"]
    assert "templates/*.html" in package_data["gpuportal.spawners"]


# --- an honest spawn form and plain errors ----------------------------------------------

LIVE_OFFERS = [
    {
        "gpu_model": "A100-80GB",
        "region": "local",
        "free_gpus": 3,
        "largest_free_gpus": 2,
        "price_per_gpu_hour": 1_500_000,
        "demo": True,
    },
    {
        "gpu_model": "RTX-4090",
        "region": "eu-west",
        "free_gpus": 0,
        "largest_free_gpus": 0,
        "price_per_gpu_hour": 700_000,
        "demo": True,
    },
]
BALANCE = Balance(
    balance=7_250_000, available=7_250_000, currency="credits", min_billable_seconds=600
)


def options_of(html: str, field: str) -> list[tuple[str, str, bool, bool]]:
    """(value, text, disabled, selected) of each option of one select, in order."""
    select = html.split(f'name="{field}"', 1)[1].split("</select>", 1)[0]
    out = []
    for part in select.split("<option")[1:]:
        head, text = part.split(">", 1)
        value = head.split('value="', 1)[1].split('"', 1)[0]
        out.append((value, text.split("</option>")[0], " disabled" in head, " selected" in head))
    return out


def test_the_form_defaults_to_cpu_and_offers_only_what_can_be_placed() -> None:
    html = form.render(PROFILES, LIVE_OFFERS, {}, balance=BALANCE, add_credit_url="/credit")
    assert 'value="cpu" checked' in html and 'value="gpu" checked' not in html
    models = options_of(html, "profile-option-gpu--gpu_model")
    assert models == [
        ("any", "Any model (3 free, from 1.50/GPU-hour, demo GPU)", False, True),
        ("A100-80GB", "NVIDIA A100 80GB (3 free, from 1.50/GPU-hour, demo GPU)", False, False),
        ("H100-80GB", "NVIDIA H100 80GB (no offers now)", True, False),
        ("L4", "NVIDIA L4 (no offers now)", True, False),
        ("RTX-4090", "RTX 4090 (none free now)", True, False),
    ]
    counts = options_of(html, "profile-option-gpu--gpu_count")
    assert [(v, d) for v, _, d, _ in counts] == [
        ("1", False),
        ("2", False),
        ("4", True),  # the largest node has 2 free
        ("8", True),
    ]
    regions = options_of(html, "profile-option-gpu--region")
    assert regions == [
        ("any", "Any region", False, True),
        ("eu-west", "eu-west (none free now)", True, False),
        ("local", "local (3 GPUs free)", False, False),
    ]
    # Region is one control; max price is one input.
    assert 'name="profile-option-gpu--region--unlisted-choice"' not in html
    assert html.count("profile-option-gpu--max_price--unlisted-choice") == 1
    assert 'placeholder="No limit"' in html


def test_the_form_shows_balance_cost_minimum_period_and_demo_label() -> None:
    html = form.render(
        PROFILES, LIVE_OFFERS, {"profile": "gpu"}, balance=BALANCE, add_credit_url="/credit"
    )
    assert "Your balance: <strong" in html and "7.25 credits" in html
    assert 'href="/credit"' in html
    assert "billed for at least <span" in html and "10 minutes" in html  # the portal's 600 s
    assert "About 1.50 credits per hour; at least 0.25 credits (10 minutes)" in html
    assert 'id="gpuportal-demo"' in html and "demo GPUs" in html
    owing = Balance(
        balance=-4_050_000, available=-4_050_000, currency="credits", min_billable_seconds=900
    )
    assert "You owe <strong" in form.render(PROFILES, LIVE_OFFERS, {}, balance=owing)
    assert "4.05 credits" in form.render(PROFILES, LIVE_OFFERS, {}, balance=owing)


def test_with_no_gpu_free_the_gpu_profile_is_disabled_with_a_reason() -> None:
    busy = [dict(o, free_gpus=0, largest_free_gpus=0) for o in LIVE_OFFERS]
    html = form.render(PROFILES, busy, {"profile": "gpu"})
    assert 'value="gpu" disabled' in html and "No GPUs are free right now." in html
    assert 'value="cpu" checked' in html


def test_hostile_names_from_a_providers_offer_are_text() -> None:
    model = '<img src=x onerror="window.pwned=1">'
    region = '"><script>window.pwned=2</script>'
    offers = [
        {
            "gpu_model": model,
            "region": region,
            "free_gpus": 1,
            "largest_free_gpus": 1,
            "price_per_gpu_hour": 1_000_000,
        }
    ]
    html = form.render(PROFILES, offers, {"profile": "gpu"})
    assert model not in html and region not in html and "<img" not in html
    assert html.count("<script>") == 1
    assert "&lt;img src=x onerror=&#34;window.pwned=1&#34;&gt;" in html
    assert "\\u003cimg" in html  # inside the costs' JSON attribute too
    # Neither can be chosen: each is listed disabled, with the reason, as text.
    for field in ("profile-option-gpu--gpu_model", "profile-option-gpu--region"):
        hostile = [o for o in options_of(html, field) if o[0] != "any"]
        assert [(d, t.endswith("(this name cannot be chosen)")) for _, t, d, _ in hostile][-1] == (
            True,
            True,
        )
    with pytest.raises(profiles.InvalidOptions):
        profiles.select(PROFILES, {"profile": "gpu", "gpu_model": model})


def test_an_empty_max_price_box_means_no_limit() -> None:
    data = {
        "profile": ["gpu"],
        "profile-option-gpu--max_price": ["unlisted-choice"],
        "profile-option-gpu--max_price--unlisted-choice": ["  "],
        "profile-option-gpu--region": ["local"],
    }
    options = profiles.options_from_form(data)
    assert options == {"profile": "gpu", "region": "local"}
    assert profiles.select(PROFILES, options).overrides["max_price"] == ""


def test_a_refusal_is_a_sentence_with_a_link_and_no_class_name() -> None:
    refusal = SpawnRefusal(
        "Your balance <is> low.",
        reason="payment_required",
        status_code=402,
        link=("/c?a=1&b", "Add credit"),
    )
    assert str(refusal) == refusal.jupyterhub_message == "Your balance <is> low."
    assert "SpawnException" not in str(refusal) and "402" not in str(refusal)
    assert refusal.jupyterhub_html_message == (
        'Your balance &lt;is&gt; low. <a href="/c?a=1&amp;b">Add credit</a>'
    )


def test_a_refusal_for_credit_links_to_credit_and_resets_the_choices() -> None:
    portal = ContractPortal(token="t0k3n", balances={"a-b": 0})
    portal.nodes.append(Node("n1", 2, "A100-80GB", "local", 1_500_000, "http://ray"))
    port = free_port()

    async def run() -> tuple[SpawnRefusal, str]:
        spawner = make_spawner(
            profile_list=default_profile_list(),
            portal_url=f"http://127.0.0.1:{port}/services/portal",
            portal_token="t0k3n",
        )
        spawner.user_options = {"profile": "gpu", "gpu_model": "A100-80GB", "gpu_count": "2"}
        spawner._apply_options()
        with pytest.raises(SpawnRefusal) as caught:
            await spawner._reserve()
        spawner._remember_refusal(caught.value)
        page = await RaySpawner._render_options_form(spawner)
        return caught.value, page

    with Served(create_app(portal), port):
        refusal, page = asyncio.run(run())
    assert refusal.status_code == 402 and refusal.credit
    assert 'href="/hub/billing">Add credit</a>' in refusal.jupyterhub_html_message
    assert 'id="gpuportal-refusal"' in page and "choices were reset" in page
    assert 'value="gpu" checked' in page  # the profile stays
    counts = options_of(page, "profile-option-gpu--gpu_count")
    assert [v for v, _, _, selected in counts if selected] == ["1"]  # not the refused 2
    models = options_of(page, "profile-option-gpu--gpu_model")
    assert [v for v, _, _, selected in models if selected] == ["any"]
    assert "0.00 credits" in page


def test_a_refusal_for_capacity_says_what_is_free() -> None:
    portal = ContractPortal(token="t0k3n")
    portal.nodes.append(Node("n1", 2, "A100-80GB", "local", 1_500_000, "http://ray"))
    port = free_port()

    async def run() -> SpawnRefusal:
        spawner = make_spawner(
            profile_list=default_profile_list(),
            portal_url=f"http://127.0.0.1:{port}/services/portal",
            portal_token="t0k3n",
        )
        spawner.user_options = {"profile": "gpu", "region": "mars"}
        spawner._apply_options()
        with pytest.raises(SpawnRefusal) as caught:
            await spawner._reserve()
        return caught.value

    with Served(create_app(portal), port):
        refusal = asyncio.run(run())
    assert refusal.status_code == 409 and not refusal.credit
    assert str(refusal).endswith(
        "Free now in local: 2x A100-80GB (up to 2 on one server, from 1.50 per GPU-hour)."
    )


def test_the_server_rechecks_callers_with_the_hub_within_token_check_seconds() -> None:
    """A revoked share loses the server within ``token_check_seconds``: the server is
    started with HubOAuth's answer cache that short (JupyterHub's default is 300 s)."""
    assert "--HubOAuth.cache_max_age=15" in make_spawner().get_args()
    args = make_spawner(token_check_seconds=0).get_args()
    assert [a for a in args if "cache_max_age" in a] == ["--HubOAuth.cache_max_age=0"]
