"""The portal service: a FastAPI app that JupyterHub runs at ``/services/portal/``.

It owns the portal DB (migrated at start), the cache, and background loops
(keeping accounts and teams in step with the hub, metering, marketplace
housekeeping). Every error leaves it as ``{"error": {"code": ..., "message": ...}}``
and every log line names the request id.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__, db
from ..settings import Settings
from .api.admin import router as admin_router
from .api.billing import router as billing_router
from .api.dashboards import router as dashboards_router
from .api.market import router as marketplace_router
from .api.payouts import router as payouts_router
from .api.providers import router as provider_router
from .api.status import router
from .api.teams import router as teams_router
from .api.templates import router as templates_router
from .auth import STATE_COOKIE, AuthRequired, oauth_redirect_url
from .context import Portal
from .loops import marketplace_loop, meter_loop, payout_loop, sync_loop
from .reqlog import RequestIdMiddleware, request_id

log = logging.getLogger(__name__)

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
    prefix = settings.service_prefix

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        the_portal = portal or Portal(settings)
        await run_in_threadpool(db.upgrade, the_portal.engine)
        await the_portal.start()
        app.state.portal = the_portal
        tasks = (
            [
                asyncio.create_task(sync_loop(the_portal)),
                asyncio.create_task(meter_loop(the_portal)),
                asyncio.create_task(marketplace_loop(the_portal)),
                asyncio.create_task(payout_loop(the_portal)),
            ]
            if background
            else []
        )
        if background and the_portal.heartbeats is not None:
            tasks.append(asyncio.create_task(the_portal.heartbeats.flush_loop()))
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
        description=DOCS_DESCRIPTION,
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
    app.include_router(dashboards_router, prefix=prefix.rstrip("/"))
    app.include_router(payouts_router, prefix=prefix.rstrip("/"))
    app.include_router(admin_router, prefix=prefix.rstrip("/"))
    app.include_router(teams_router, prefix=prefix.rstrip("/"))
    app.include_router(templates_router, prefix=prefix.rstrip("/"))
    _mount_docs(app, prefix)
    _declare_token_auth(app)
    return app


#: What the docs page says first: who "Try it out" acts as, and how to write.
DOCS_DESCRIPTION = (
    "The control plane of gpuportal: accounts, teams, health, the marketplace, "
    "metering and billing.\n\n"
    "**Try it out acts as you.** Opened from the hub, this page carries your login "
    "cookie, which is good for reading only (GET). To change anything, make a token on "
    "the hub's [Token page](../../hub/token), click **Authorize** and enter "
    "`token <your token>`; every request then carries it as `Authorization: token ...`."
)


def _declare_token_auth(app: FastAPI) -> None:
    """The hub API token as an OpenAPI security scheme, so the docs page has an
    Authorize button and "Try it out" can send a token (and so write)."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            schema.setdefault("components", {})["securitySchemes"] = {
                "hubToken": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Authorization",
                    "description": "Your hub API token, entered as `token <TOKEN>` "
                    "(make one on the hub's Token page).",
                }
            }
            schema["security"] = [{"hubToken": []}, {}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


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
