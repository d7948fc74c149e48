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

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from jupyterhub.services.auth import HubOAuth
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__, accounts, db
from .auth import STATE_COOKIE, AuthRequired, oauth_redirect_url
from .cache import Cache, make_cache
from .hubapi import HubAPI, HubUnavailable
from .reqlog import RequestIdMiddleware, request_id
from .settings import Settings
from .timeutil import utcnow

log = logging.getLogger(__name__)

ERROR_CODES = {
    400: "bad_request", 401: "unauthenticated", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 409: "conflict", 422: "invalid", 429: "too_many_requests",
    503: "unavailable",
}


class Portal:
    """Everything a request handler may need, built once per process."""

    def __init__(self, settings: Settings, cache: Cache | None = None,
                 hub: HubAPI | None = None) -> None:
        self.settings = settings
        self.engine = db.make_engine(settings.database_url)
        self.sessions = db.session_factory(self.engine)
        self.cache: Cache = cache or make_cache(settings.redis_url)
        self.hub = hub or HubAPI(settings.hub_api_url, settings.api_token.get_secret_value())

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
        """Marketplace housekeeping every heartbeat interval (at most 30 s); never dies:
        expire held reservations (their GPUs go back), mark nodes that missed
        heartbeats offline, refresh reliability scores."""
        from .marketplace import expire_held
        from .nodes import mark_offline, refresh_reliability
        from .provider_routes import node_rules

        rules = node_rules(self.settings)
        interval = float(min(30, self.settings.heartbeat_seconds))

        def housekeeping() -> None:
            with db.transaction(self.sessions) as session:
                now = utcnow()
                expire_held(session, now)
                mark_offline(session, rules, now)
                refresh_reliability(session, rules, now)

        while True:
            try:
                await run_in_threadpool(housekeeping)
            except Exception:
                log.exception("marketplace housekeeping failed")
            await asyncio.sleep(interval * random.uniform(0.8, 1.2))  # noqa: S311

    async def close(self) -> None:
        await self.hub.close()
        await self.cache.close()
        self.engine.dispose()


def error_body(status: int, message: str, code: str | None = None) -> dict[str, Any]:
    return {
        "error": {
            "code": code or ERROR_CODES.get(status, "error"),
            "message": message,
            "request_id": request_id.get(),
        }
    }


def create_app(settings: Settings, portal: Portal | None = None, *,
               background: bool = True) -> FastAPI:
    """Build the app. ``background=False`` skips the hub sync loop (unit tests)."""
    from .marketplace_routes import router as marketplace_router
    from .provider_routes import router as provider_router
    from .routes import router

    prefix = settings.service_prefix

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        the_portal = portal or Portal(settings)
        await run_in_threadpool(db.upgrade, the_portal.engine)
        app.state.portal = the_portal
        tasks = [asyncio.create_task(the_portal.sync_loop()),
                 asyncio.create_task(the_portal.marketplace_loop())] if background else []
        log.info("portal service %s ready at %s (db %s, cache %s)", __version__, prefix,
                 the_portal.engine.url.get_backend_name(), the_portal.cache.backend)
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
        docs_url=f"{prefix}docs",
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
            response.set_cookie(STATE_COOKIE, state, max_age=600, httponly=True,
                                samesite="lax", path=prefix)
            return response
        message = exc.detail if isinstance(exc.detail, str) else "Request failed."
        if exc.status_code == 404 and message == "Not Found":
            message = f"No such endpoint: {request.method} {request.url.path}"
        if exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return JSONResponse(error_body(exc.status_code, message, getattr(exc, "code", None)),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

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
    app.include_router(marketplace_router, prefix=prefix.rstrip("/"))
    app.include_router(provider_router, prefix=prefix.rstrip("/"))
    return app


def _wants_html(request: Request) -> bool:
    return request.method == "GET" and "text/html" in request.headers.get("accept", "")
