"""The portal service: a FastAPI app that JupyterHub runs at ``/services/portal/``.

It owns the portal DB (migrated at start), the cache, and background loops
(today: keeping accounts and teams in step with the hub). Every error leaves it
as ``{"error": {"code": ..., "message": ...}}`` and every log line names the
request id.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from functools import cached_property
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from jupyterhub.services.auth import HubOAuth
from redis.exceptions import RedisError
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__, accounts, db, egress, raystatus
from .auth import STATE_COOKIE, AuthRequired, oauth_redirect_url
from .cache import Cache, make_cache
from .capacity import CapacityIndex
from .hubapi import HubAPI, HubUnavailable
from .marketplace import OFFERS_CACHE_KEY, SUMMARY_CACHE_KEY, rules_of
from .marketplace_models import Cluster
from .reqlog import RequestIdMiddleware, request_id
from .settings import Settings
from .timeutil import utcnow

log = logging.getLogger(__name__)

#: Seconds one Ray dashboard may take to list its nodes, and how many are asked at once.
RAY_CHECK_TIMEOUT = 5.0
RAY_CHECK_CONCURRENCY = 16

ERROR_CODES = {
    400: "bad_request",
    401: "unauthenticated",
    402: "payment_required",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    422: "invalid",
    429: "too_many_requests",
    503: "unavailable",
}


class Portal:
    """Everything a request handler may need, built once per process."""

    def __init__(
        self,
        settings: Settings,
        cache: Cache | None = None,
        hub: HubAPI | None = None,
        chain: Any | None = None,
    ) -> None:
        self.settings = settings
        self.engine = db.make_engine(settings.database_url)
        self.sessions = db.session_factory(self.engine)
        self.cache: Cache = cache or make_cache(settings.redis_url)
        self.hub = hub or HubAPI(settings.hub_api_url, settings.api_token.get_secret_value())
        #: The Solana chain deposits are verified on (hub.deposits); made on first use.
        self.chain = chain
        #: This process's placement index, following every commit made through
        #: ``sessions``; loaded by ``start`` (see hub.capacity).
        self.capacity = CapacityIndex(rules_of(settings))
        self.capacity.attach(self.sessions)
        self.capacity.on_change(self._capacity_changed)
        #: Unanswered Ray dashboard checks in a row, per cluster pk.
        self.ray_misses: dict[int, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        """Once the schema is migrated: load the placement index."""
        self._loop = asyncio.get_running_loop()
        await run_in_threadpool(self.capacity.load)

    def _capacity_changed(self) -> None:
        """From the committing thread: drop the cached offers, for every portal process
        sharing the cache (this one already ignores entries older than the change)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with suppress(RuntimeError):  # the loop is shutting down
            loop.call_soon_threadsafe(self._drop_offers)

    def _drop_offers(self) -> None:
        task = asyncio.get_running_loop().create_task(self._delete_offers())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _delete_offers(self) -> None:
        try:
            for key in (OFFERS_CACHE_KEY, SUMMARY_CACHE_KEY):
                await self.cache.delete(key)
        except (RedisError, OSError) as exc:
            log.warning("could not drop the cached offers: %s", exc)

    @cached_property
    def oauth(self) -> HubOAuth:
        return HubOAuth(
            api_url=self.settings.hub_api_url,
            api_token=self.settings.api_token.get_secret_value(),
            base_url=self.settings.service_prefix,
            cache_max_age=0,
        )

    async def sync_from_hub(self) -> dict[str, int]:
        users, groups = await self.hub.users(), await self.hub.groups()

        def write() -> dict[str, int]:
            with db.transaction(self.sessions) as session:
                return accounts.sync(session, users, groups)

        counts = await run_in_threadpool(write)
        if any(counts.values()):
            log.info("synced from hub: %s", counts)
        return counts

    async def sync_loop(self) -> None:
        """Sync at start, then every ``hub_sync_seconds`` with jitter; never dies."""
        interval = self.settings.hub_sync_seconds
        while True:
            try:
                await asyncio.wait_for(self.sync_from_hub(), timeout=max(10.0, interval))
            except (HubUnavailable, TimeoutError) as exc:
                log.warning("hub sync skipped: %s", exc)
            except Exception:
                log.exception("hub sync failed")
            await asyncio.sleep(interval * random.uniform(0.8, 1.2))  # noqa: S311

    async def marketplace_loop(self) -> None:
        """Marketplace housekeeping every heartbeat interval (at most 30 s), with jitter;
        never dies."""
        interval = float(min(30, self.settings.heartbeat_seconds))
        while True:
            await self.marketplace_housekeeping()
            await asyncio.sleep(interval * random.uniform(0.8, 1.2))  # noqa: S311

    async def marketplace_housekeeping(self) -> None:
        """One round: expire held reservations (their GPUs go back), mark nodes that
        missed heartbeats offline, refresh reliability scores, cross-check Ray's
        own node state, and rebuild the placement index from SQL when due. Each
        step is guarded, so one failing never skips the others."""
        from .marketplace import expire_held
        from .nodes import lapse_challenges, mark_offline, refresh_reliability
        from .provider_routes import node_rules

        rules = node_rules(self.settings)

        def housekeeping() -> None:
            with db.transaction(self.sessions) as session:
                now = utcnow()
                expire_held(session, now)
                mark_offline(session, rules, now)
                lapse_challenges(session, rules, now)
                refresh_reliability(session, rules, now)

        try:
            await run_in_threadpool(housekeeping)
        except Exception:
            log.exception("marketplace housekeeping failed")
        try:
            await self.check_ray()
        except Exception:
            log.exception("Ray cross-check failed")
        if self.capacity.rebuild_due():
            try:
                await run_in_threadpool(self.capacity.load)
            except Exception:
                log.exception("placement index rebuild failed")

    async def check_ray(self) -> list[str]:
        """Ask each cluster's dashboard which marketplace nodes its Ray runs, and take
        offline those it does not (``nodes.apply_ray_view``). Every call is bounded
        by ``RAY_CHECK_TIMEOUT``; a dashboard that does not answer is logged and
        counts as a missed check. Returns the node ids whose status changed."""
        from . import nodes
        from .provider_routes import node_rules

        rules = node_rules(self.settings)

        def targets() -> tuple[dict[int, tuple[str, list[str]]], dict[int, str | None], set[int]]:
            with db.transaction(self.sessions) as session:
                found = nodes.clusters_to_check(session)
                rows = session.execute(
                    select(Cluster.id, Cluster.ray_token).where(Cluster.id.in_(list(found)))
                )
                tokens = {pk: token for pk, token in rows}
                return found, tokens, nodes.house_clusters(session)

        clusters, tokens, house = await run_in_threadpool(targets)
        if not clusters:
            return []
        gate = asyncio.Semaphore(RAY_CHECK_CONCURRENCY)
        allowed = egress.parse_networks(self.settings.provider_networks_allowed)

        async def ask(client: httpx.AsyncClient, pk: int, url: str) -> dict[str, str] | None:
            async with gate:
                # A provider's URL is fetched only on an allowed network (hub.egress).
                refused = (
                    None if pk in house else await run_in_threadpool(egress.refusal, url, allowed)
                )
                if refused:
                    log.warning("Ray dashboard of cluster %d not fetched: %s", pk, refused)
                    return None
                try:
                    return await raystatus.node_states(
                        client, url, RAY_CHECK_TIMEOUT, tokens.get(pk)
                    )
                except raystatus.RayUnreachable as exc:
                    log.debug("Ray dashboard %s: %s", _host(url), exc)
                    return None

        async with httpx.AsyncClient() as client:
            answers = await asyncio.gather(
                *(ask(client, pk, url) for pk, (url, _) in clusters.items())
            )
        views: dict[int, tuple[dict[str, str] | None, int]] = {}
        for pk, states in zip(clusters, answers, strict=True):
            if states is None:
                misses = self.ray_misses[pk] = self.ray_misses.get(pk, 0) + 1
                log.warning(
                    "Ray dashboard of cluster %d at %s did not answer (%d missed checks in a row)",
                    pk,
                    _host(clusters[pk][0]),
                    misses,
                )
            else:
                self.ray_misses.pop(pk, None)
                misses = 0
            views[pk] = (states, misses)

        def apply() -> list[str]:
            changed: list[str] = []
            with db.transaction(self.sessions) as session:
                now = utcnow()
                for pk, (states, misses) in views.items():
                    changed += nodes.apply_ray_view(session, pk, states, misses, rules, now)
            return changed

        return await run_in_threadpool(apply)

    async def close(self) -> None:
        if self._tasks:  # offers invalidations still in flight: let them finish (bounded)
            await asyncio.wait(set(self._tasks), timeout=5)
        await self.hub.close()
        await self.cache.close()
        self.engine.dispose()


def _host(url: str) -> str:
    """Host and port of a URL, for logs (never its credentials or path)."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return "?"
    return f"{parsed.host}:{parsed.port}" if parsed.port else parsed.host


def error_body(status: int, message: str, code: str | None = None) -> dict[str, Any]:
    return {
        "error": {
            "code": code or ERROR_CODES.get(status, "error"),
            "message": message,
            "request_id": request_id.get(),
        }
    }


def create_app(
    settings: Settings, portal: Portal | None = None, *, background: bool = True
) -> FastAPI:
    """Build the app. ``background=False`` skips the background loops (unit tests)."""
    from .billing_routes import router as billing_router
    from .marketplace_routes import router as marketplace_router
    from .metering import meter_loop
    from .provider_routes import router as provider_router
    from .routes import router

    prefix = settings.service_prefix

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        the_portal = portal or Portal(settings)
        await run_in_threadpool(db.upgrade, the_portal.engine)
        await the_portal.start()
        app.state.portal = the_portal
        tasks = (
            [
                asyncio.create_task(the_portal.sync_loop()),
                asyncio.create_task(meter_loop(the_portal)),
                asyncio.create_task(the_portal.marketplace_loop()),
            ]
            if background
            else []
        )
        log.info(
            "portal service %s ready at %s (db %s, cache %s)",
            __version__,
            prefix,
            the_portal.engine.url.get_backend_name(),
            the_portal.cache.backend,
        )
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task
            await the_portal.close()

    app = FastAPI(
        title="gpuportal portal API",
        version=__version__,
        description="The control plane of gpuportal: accounts, teams, health; "
        "marketplace, metering and billing as they land.",
        docs_url=None,  # served below from local files: no CDN, works offline
        redoc_url=None,
        openapi_url=f"{prefix}openapi.json",
        lifespan=lifespan,
    )
    app.add_middleware(RequestIdMiddleware)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if isinstance(exc, AuthRequired) and _wants_html(request):
            portal_: Portal = request.app.state.portal
            url, state = oauth_redirect_url(portal_, str(request.url.path))
            response = RedirectResponse(url, status_code=302)
            response.set_cookie(
                STATE_COOKIE, state, max_age=600, httponly=True, samesite="lax", path=prefix
            )
            return response
        message = exc.detail if isinstance(exc.detail, str) else "Request failed."
        if exc.status_code == 404 and message == "Not Found":
            message = f"No such endpoint: {request.method} {request.url.path}"
        if exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return JSONResponse(
            error_body(exc.status_code, message, getattr(exc, "code", None)),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid value')}" if where else "Invalid request."
        return JSONResponse(error_body(422, message), status_code=422)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> Response:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(
            error_body(500, "The portal hit an internal error; it has been logged.", "internal"),
            status_code=500,
        )

    app.include_router(router, prefix=prefix.rstrip("/"))
    app.include_router(billing_router, prefix=prefix.rstrip("/"))
    app.include_router(marketplace_router, prefix=prefix.rstrip("/"))
    app.include_router(provider_router, prefix=prefix.rstrip("/"))
    _mount_docs(app, prefix)
    return app


def _mount_docs(app: FastAPI, prefix: str) -> None:
    """Swagger UI from the swagger-ui-bundle package, so the docs need no CDN."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles
    from swagger_ui_bundle import swagger_ui_path

    app.mount(f"{prefix}static/swagger", StaticFiles(directory=swagger_ui_path), name="swagger")

    @app.get(f"{prefix}docs", include_in_schema=False)
    async def docs() -> Response:
        return get_swagger_ui_html(
            openapi_url=f"{prefix}openapi.json",
            title="gpuportal portal API",
            swagger_js_url=f"{prefix}static/swagger/swagger-ui-bundle.js",
            swagger_css_url=f"{prefix}static/swagger/swagger-ui.css",
            swagger_favicon_url=f"{prefix}static/swagger/favicon-32x32.png",
        )


def _wants_html(request: Request) -> bool:
    return request.method == "GET" and "text/html" in request.headers.get("accept", "")
