"""Shared fixtures: real SQLite and PostgreSQL, real Redis, a real local Ray
cluster, and the real embedded stack (``gpuportal up``) on random ports.

A missing PostgreSQL, Redis or Chromium **fails** the tests that need it: CI
(``CI`` set, as every CI service sets it) must run all of them, and a silent
skip would hide a hundred tests. On a developer's laptop,
``GPUPORTAL_TEST_ALLOW_SKIP=1`` turns those failures into skips with the
reason shown; CI ignores that opt-out.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import psutil
import pytest
from sqlalchemy import Engine
from sqlalchemy.engine import make_url

from gpuportal.hub import db as portal_db
from gpuportal.hub import timeutil
from gpuportal.hub.settings import Settings, load_settings

from . import portal_stack
from .fakes import Clock, FakeHub, PortalClientFactory
from .portal_stack import OTHER_SERVICE_TOKEN, Stack, free_port, start_stack, stop_stack

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
#: Read before the GPUPORTAL_* variables are cleared below.
ALLOW_SKIP = os.environ.get("GPUPORTAL_TEST_ALLOW_SKIP") == "1" and not os.environ.get("CI")
# A test never reads the developer's own settings.
for _key in [k for k in os.environ if k.startswith("GPUPORTAL_")]:
    del os.environ[_key]

PG_ADMIN_URL = os.environ.get("TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/13")


def service_missing(reason: str) -> NoReturn:
    """A service a test needs is missing: fail, or skip where a developer opted in."""
    if ALLOW_SKIP:
        pytest.skip(reason)
    pytest.fail(
        f"{reason.rstrip('.')}. Tests need it; start it, or on a laptop (not in CI) set "
        "GPUPORTAL_TEST_ALLOW_SKIP=1 to skip these tests instead.",
        pytrace=False,
    )


def _pg_available() -> str | None:
    import psycopg

    try:
        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3):
            return None
    except psycopg.Error as exc:
        return f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc}"


def _redis_available() -> str | None:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except (redis.RedisError, OSError) as exc:
        return f"Redis not reachable at {REDIS_URL}: {exc}"
    return None


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for the session (dropped afterwards)."""
    reason = _pg_available()
    if reason:
        service_missing(reason)
    import psycopg

    name = f"gpuportal_test_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(PG_ADMIN_URL).set(drivername="postgresql+psycopg", database=name)
    yield url.render_as_string(hide_password=False)
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A portal DB URL on each backend: SQLite in tmp, and a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'portal.sqlite'}"
        return
    base = request.getfixturevalue("pg_url")
    engine = portal_db.make_engine(load_settings(db_url=base).database_url)
    # Each test starts from an empty schema in the session's database.
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    engine.dispose()
    yield base


@pytest.fixture
def db(db_url: str, tmp_path: Path) -> Iterator[Engine]:
    """A migrated portal DB engine, on SQLite and on PostgreSQL."""
    settings = load_settings(db_url=db_url, data_dir=tmp_path)
    engine = portal_db.make_engine(settings.database_url)
    portal_db.upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """The time every module reads (``timeutil.utcnow``), moved by the test."""
    the_clock = Clock()
    monkeypatch.setattr(timeutil, "utcnow", the_clock)
    return the_clock


@pytest.fixture
def portal_client(tmp_path: Path, db_url: str) -> Iterator[PortalClientFactory]:
    """Make the portal app (its background loops off) and a TestClient for it.

    ``portal_client(hub=None, cache=None, chain=None, raise_server_exceptions=True,
    **settings)``:
    ``settings`` override :func:`load_settings` (the data dir is the test's tmp dir and
    the DB is ``db_url``, on each backend, unless given); ``hub`` defaults to a
    :class:`FakeHub` with no users. The client has started the app (its lifespan
    ran) and is closed after the test; its ``Portal`` is ``client.app.state.portal``.
    """
    from fastapi.testclient import TestClient

    from gpuportal.hub.portal.app import create_app
    from gpuportal.hub.portal.cache import MemoryCache
    from gpuportal.hub.portal.context import Portal

    with ExitStack() as opened:

        def make(
            *,
            hub: Any = None,
            cache: Any = None,
            chain: Any = None,
            raise_server_exceptions: bool = True,
            **overrides: Any,
        ) -> TestClient:
            overrides.setdefault("data_dir", tmp_path)
            overrides.setdefault("db_url", db_url)
            settings = load_settings(**overrides)
            extra = {"chain": chain} if chain is not None else {}
            portal = Portal(
                settings,
                cache=cache or MemoryCache(),
                hub=hub if hub is not None else FakeHub({}),
                **extra,
            )
            client = TestClient(
                create_app(settings, portal, background=False),
                raise_server_exceptions=raise_server_exceptions,
            )
            opened.enter_context(client)
            return client

        yield make


@pytest.fixture
def redis_url() -> str:
    reason = _redis_available()
    if reason:
        service_missing(reason)
    return REDIS_URL


CHROMIUM = os.environ.get("TEST_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture
def browser_page() -> Iterator[object]:
    """A Playwright page in headless Debian Chromium, with background networking off."""
    if not Path(CHROMIUM).exists():
        service_missing(f"Chromium not installed at {CHROMIUM} (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-default-apps",
            ],
        )
        page = browser.new_page()
        yield page
        browser.close()


@dataclass
class RayCluster:
    settings: Settings
    jobs_url: str
    pids: list[int] = field(default_factory=list)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    """A real local Ray head with two logical (demo) A100 GPUs, for the session."""
    from gpuportal.hub.stack.localray import LocalRayHead, plan_gpus

    settings = load_settings(
        data_dir=tmp_path_factory.mktemp("ray"),
        ray_port=free_port(),
        ray_dashboard_port=free_port(),
        demo_gpus="2xA100-80GB",
        ray_num_cpus=2,
    )
    head = LocalRayHead(settings)
    # A marker of the control plane's environment that must not reach Ray.
    os.environ["GPUPORTAL_TEST_MARKER"] = "control-plane-only"
    state = head.start(plan_gpus(settings))
    leader = psutil.Process(int(str(state["pid"])))
    cluster = RayCluster(
        settings,
        str(state["jobs_url"]),
        [leader.pid, *(p.pid for p in leader.children(recursive=True))],
    )
    yield cluster
    head.stop()


#: The stacks several test modules share, by the fixture that gives each, with the
#: settings that tell them apart. A run starts each once (see :class:`SharedStacks`).
SHARED_STACKS: dict[str, dict[str, str]] = {
    # The default stack: a customer signs up and gets the sign-up credit at once
    # (OAuth-like), so they can spawn; an untrusted hub service is known too.
    "stack": {
        "GPUPORTAL_DEMO_GPUS": "2xA100-80GB",
        "GPUPORTAL_SIGNUP_CREDIT_POLICY": "identity",
    },
}


class SharedStacks:
    """The session's shared stacks: each started on first use, stopped after its last.

    :func:`pytest_collection_modifyitems` runs the modules that use one stack one
    after another and notes each stack's last test; once that test is done, its
    stack stops, so at most one shared stack runs at a time.
    """

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self.tmp_path_factory = tmp_path_factory
        self.running: dict[str, Stack] = {}
        self.starts: list[str] = []

    def get(self, name: str) -> Stack:
        if name not in self.running:
            data = self.tmp_path_factory.mktemp(name) / "data"
            extra = dict(SHARED_STACKS[name])
            if name == "stack":
                config = data.parent / "extra_config.py"
                config.write_text(
                    "c.JupyterHub.services.append("
                    f"{{'name': 'other-service', 'api_token': {OTHER_SERVICE_TOKEN!r}}})\n"
                )
                extra["GPUPORTAL_HUB_EXTRA_CONFIG"] = str(config)
            self.running[name] = start_stack(data, **extra)
            self.starts.append(name)
        return self.running[name]

    def stop(self, name: str) -> None:
        running = self.running.pop(name, None)
        if running is not None:
            stop_stack(running)

    def stop_all(self) -> None:
        for name in list(self.running):
            self.stop(name)


_shared: SharedStacks | None = None
#: Each shared stack's last test, set at collection.
_last_user: dict[str, str] = {}


@pytest.fixture(scope="session")
def shared_stacks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedStacks]:
    global _shared
    _shared = SharedStacks(tmp_path_factory)
    try:
        yield _shared
    finally:
        _shared.stop_all()
        _shared = None


@pytest.fixture(scope="session")
def stack(shared_stacks: SharedStacks) -> Stack:
    """The whole embedded stack with 2xA100-80GB demo GPUs, shared by every module."""
    return shared_stacks.get("stack")


def _stack_of(item: pytest.Item) -> str | None:
    """The shared stack a test uses, if any: a module's own ``stack`` fixture is not."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return None
    for name in SHARED_STACKS:
        chain = info.name2fixturedefs.get(name)
        if chain and getattr(chain[-1].func, "__module__", None) == __name__:
            return name
    return None


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the modules that share a stack one after another, in their first one's place,
    each with the tests that use it first."""
    modules: dict[Any, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(item.module, []).append(item)  # type: ignore[attr-defined]
    key = {
        module: next((k for k in map(_stack_of, its) if k), None) for module, its in modules.items()
    }
    ordered: list[pytest.Item] = []
    placed: set[Any] = set()
    for module in modules:
        if module in placed:
            continue
        group = [module] if key[module] is None else [m for m in modules if key[m] == key[module]]
        for member in group:
            placed.add(member)
            # The shared stack's tests first, so it stops before the module's others run.
            ordered.extend(sorted(modules[member], key=lambda item: _stack_of(item) is None))
    items[:] = ordered
    _check_heavy_modules(items)
    _last_user.clear()
    for item in items:
        name = _stack_of(item)
        if name:
            _last_user[name] = item.nodeid


#: Markers of tests that start Ray, a stack or a browser (see pyproject.toml).
HEAVY_MARKERS = frozenset({"ray", "browser", "slow"})
#: The modules with such tests (or a shared stack's): under ``pytest -n 2`` (``make
#: test``) they all run on one worker, in this run's order, so the shared stacks still
#: start once and at most one stack runs at a time; the other worker takes the rest.
#: Collection fails if a module with such a test is missing here.
HEAVY_MODULES = frozenset(
    {
        "tests/dashboards/test_dashboards_stack.py",
        "tests/extension/test_lab_browser.py",
        "tests/extension/test_with_portal.py",
        "tests/ledger/test_billing_stack.py",
        "tests/marketplace/test_marketplace_api.py",
        "tests/marketplace/test_provider_join.py",
        "tests/marketplace/test_ray_check.py",
        "tests/spawner/test_faults.py",
        "tests/spawner/test_lifecycle.py",
        "tests/spawner/test_restart.py",
        "tests/spawner/test_stack.py",
        "tests/spawner/test_warm.py",
        "tests/test_admin_pages.py",
        "tests/test_e2e_billing.py",
        "tests/test_hub_pages.py",
        "tests/test_isolation.py",
        "tests/test_localray.py",
        "tests/test_stack.py",
        "tests/test_teams_stack.py",
        "tests/test_template_notebooks.py",
        "tests/test_templates_stack.py",
    }
)


def _module_path(nodeid: str) -> str:
    return nodeid.split("::", 1)[0].split("@", 1)[0]


def _check_heavy_modules(items: list[pytest.Item]) -> None:
    """Every module that starts Ray, a stack or a browser is in HEAVY_MODULES."""
    missing = sorted(
        {
            _module_path(item.nodeid)
            for item in items
            if _stack_of(item) or any(m.name in HEAVY_MARKERS for m in item.iter_markers())
        }
        - HEAVY_MODULES
    )
    if missing:
        raise pytest.UsageError(
            "these modules start Ray, a stack or a browser; add them to HEAVY_MODULES in "
            f"tests/conftest.py so they run on the stacks' worker: {', '.join(missing)}"
        )


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadscope`` with one scope for all of HEAVY_MODULES (one worker runs
    them, in collection order), and a scope per module (or class) for the rest."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class StacksOnOneWorker(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            if _module_path(nodeid) in HEAVY_MODULES:
                return "stacks"
            return str(super()._split_scope(nodeid))

    return StacksOnOneWorker(config, log)


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    name = _stack_of(item)
    if name and _shared is not None and _last_user.get(name) == item.nodeid:
        _shared.stop(name)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say how many times this run started ``gpuportal up``: sharing stacks keeps it low."""
    if portal_stack.STARTED:
        terminalreporter.write_line(
            f"gpuportal up started {len(portal_stack.STARTED)} time(s): "
            + ", ".join(path.parent.name for path in portal_stack.STARTED)
        )
