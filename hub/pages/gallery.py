"""The template gallery, ``/hub/templates``: browse, **Open on GPU**, publish.

* ``GET /hub/templates``: the templates the user may see (global, and their teams'),
  each with its GPU needs, estimated cost and an Open on GPU button (``gallery.html``);
* ``POST /hub/templates/open/<kind>/<key>``: step one of Open on GPU. Starts the
  user's server with the template's profile, or finds the running one that fits;
  answers JSON: ``{"state": "ready"}``, ``{"state": "starting", "progress_url"}`` or
  a refusal (4xx with ``{"message"}``);
* ``POST /hub/templates/copy/<kind>/<key>``: step two, once the server is ready. Copies
  the notebook into the server through its contents API and answers ``{"url"}``, where
  JupyterLab opens it;
* ``GET|POST /hub/templates/publish``: a team admin publishes a notebook from their
  running server as a team template, with a metadata form.

Every read of the portal is made as the user (``PortalReader``), so the portal's rules
decide what a user sees: another team's template is a 404 here too. Writing to the user's
server uses a hub token of that user made for one copy, scoped to that one server
(``access:servers!server=<user>/``), valid 2 minutes and deleted right after; publishing
uses a token that may use the portal (``PortalAdminClient``'s kind, the portal checks the
team-admin role).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, urlencode

import httpx
from jupyterhub import orm
from jupyterhub.handlers import BaseHandler
from tornado import web
from tornado.httputil import url_concat

from gpuportal.spawners.profiles import BILL_TO

from .portal_reader import Configured, PortalAdminClient, PortalReader, PortalUnavailable

#: The gallery's path below the hub's prefix.
GALLERY_PAGE = "templates"
#: How long Open on GPU waits for the spawn before it answers "starting" (seconds): a
#: refusal that comes at once (bad options, a spawn already pending) is answered directly.
QUICK_REFUSAL_SECONDS = 1.0
#: How long the token of one copy into a server lives (seconds); it is deleted after use.
COPY_TOKEN_SECONDS = 120
#: The largest notebook the publish form takes from a server (the portal's cap too).
MAX_NOTEBOOK_BYTES = 1024 * 1024
TEMPLATE_ID = re.compile(r"(global/[A-Za-z0-9._-]{1,80}|team/[0-9]{1,18})")
#: A notebook path in the user's server: relative, no '..', ends in .ipynb.
NOTEBOOK_PATH = re.compile(r"(?!/)(?!.*(?:^|/)\.\.(?:/|$))[^\\\x00-\x1f]{1,250}\.ipynb")

reader: Configured[PortalReader] = Configured("The template gallery is")
publisher: Configured[PortalAdminClient] = Configured("The template gallery is")
_http = httpx.AsyncClient(timeout=15.0)


class Publisher(PortalAdminClient):
    """Sends a publish request to the portal as the user: its token may use the portal
    (the portal checks the team-admin role), lives 15 minutes, stays in memory."""

    note = "gpuportal template publishing (renewed automatically)"


def set_clients(portal_reader: PortalReader, portal_publisher: PortalAdminClient) -> None:
    reader.set(portal_reader)
    publisher.set(portal_publisher)


def user_options(template: dict[str, Any], teams: Iterable[str] = ()) -> dict[str, str]:
    """The spawn form's options (the default profile list) for a template's needs.

    A team's template, opened by a member of that team (``teams``: the user's hub
    groups), is billed to the team ("Bill to" on the spawn form); the spawner and the
    portal check the membership again, and a team that cannot pay refuses the spawn
    with its sentence. A global template is billed to the user's own wallet.
    """
    if int(template["gpu_count"]) == 0:
        return {"profile": "cpu"}
    options = {
        "profile": "gpu",
        "gpu_model": template.get("gpu_model") or "any",
        "gpu_count": str(template["gpu_count"]),
    }
    team = template.get("team")
    if team and team in set(teams):
        options[BILL_TO] = str(team)
    return options


def needs(template: dict[str, Any]) -> str:
    """``2x L4 (16 GB+)``, ``1x any GPU``, ``CPU only``."""
    count = int(template["gpu_count"])
    if count == 0:
        return "CPU only"
    text = f"{count}x {template.get('gpu_model') or 'any GPU'}"
    if template.get("min_vram_gb"):
        text += f" ({template['min_vram_gb']} GB+)"
    return text


def server_fits(spawner: Any, template: dict[str, Any]) -> bool:
    """Whether a running server already has what the template needs."""
    wanted = int(template["gpu_count"])
    if wanted == 0:
        return True
    have = int(getattr(spawner, "gpu_count", 0) or 0)
    model = template.get("gpu_model")
    return have >= wanted and (not model or getattr(spawner, "gpu_model", "") == model)


def _log_spawn_failure(handler: BaseHandler, template_id: str, name: str) -> Any:
    def done(future: asyncio.Future[Any]) -> None:
        if not future.cancelled() and future.exception() is not None:
            handler.log.info(
                "template %s: %s's server did not start: %s", template_id, name, future.exception()
            )

    return done


def _why_not_running(spawner: Any) -> str:
    """The failed start's sentence (the spawner's own), or a plain one."""
    future = getattr(spawner, "_spawn_future", None)
    if future is not None and future.done() and not future.cancelled() and future.exception():
        return f"Your server did not start: {str(future.exception())[:500]}"
    return "Your server is not running; open the template again to start one."


def _json(handler: BaseHandler, status: int, body: dict[str, Any]) -> None:
    handler.set_status(status)
    handler.set_header("Content-Type", "application/json")
    handler.set_header("Cache-Control", "no-store")
    handler.finish(json.dumps(body))


async def _template(user: Any, template_id: str) -> dict[str, Any] | None:
    if not TEMPLATE_ID.fullmatch(template_id):
        return None
    found: dict[str, Any] | None = await reader().get(user, f"templates/{template_id}")
    return found


async def _template_or_answer(
    handler: BaseHandler, user: Any, template_id: str
) -> dict[str, Any] | None:
    """The template the user may open, or None once the handler has answered why not."""
    try:
        template = await _template(user, template_id)
    except PortalUnavailable as exc:
        _json(handler, 503, {"message": str(exc)})
        return None
    if template is None:
        _json(handler, 404, {"message": "There is no such template."})
    return template


class Gallery(BaseHandler):
    """The templates this user may see, with GPU needs, cost and Open on GPU."""

    @web.authenticated
    async def get(self) -> None:
        user = self.current_user
        error = None
        entries: list[dict[str, Any]] = []
        teams: list[str] = []
        try:
            entries = await reader().get(user, "templates") or []
            teams = await reader().get(user, "templates-teams") or []
        except PortalUnavailable as exc:
            error = str(exc)
        for entry in entries:
            entry["needs"] = needs(entry)
        spawner = user.spawners.get("")
        html = await self.render_template(
            "gallery.html",
            user=user,
            templates=entries,
            teams=teams,
            error=error,
            done=self.get_argument("done", "")[:300],
            server_running=bool(spawner and spawner.ready),
            gallery=f"{self.hub.base_url}{GALLERY_PAGE}",
        )
        self.finish(html)


class OpenTemplate(BaseHandler):
    """Step one of Open on GPU: a server that fits, started if need be."""

    @web.authenticated
    async def post(self, template_id: str) -> None:
        user = self.current_user
        template = await _template_or_answer(self, user, template_id)
        if template is None:
            return None
        check = self.get_argument("check", "") == "1"
        # (A check keeps a failed spawner, whose failure it reports; an open replaces it.)
        spawner = user.spawners.get("") if check else user.get_spawner("", replace_failed=True)
        if spawner is None:
            return _json(self, 409, {"message": _why_not_running(None)})
        # The hub's progress stream, with the XSRF token a cookie-authenticated GET of
        # the hub's API needs (as the hub's own spawn-pending page does).
        progress_url = url_concat(
            f"{self.hub.base_url}api/users/{quote(user.name, safe='')}/server/progress",
            {"_xsrf": self.xsrf_token.decode("ascii")},
        )
        if spawner.pending == "spawn":
            return _json(self, 200, {"state": "starting", "progress_url": progress_url})
        if spawner.pending:
            return _json(self, 409, {"message": "Your server is stopping; try again in a moment."})
        if spawner.ready:
            if server_fits(spawner, template):
                return _json(self, 200, {"state": "ready"})
            return _json(
                self,
                409,
                {
                    "message": f"Your running server does not have what this template needs "
                    f"({needs(template)}). Stop it on the home page, then open the template "
                    "again to start a server that fits."
                },
            )
        if check:
            # The page asks how the start it follows went: never start another one.
            return _json(self, 409, {"message": _why_not_running(spawner)})
        options = user_options(template, (g.name for g in user.groups))
        self.log.info("template %s: starting %s's server with %s", template_id, user.name, options)
        # The hub's own spawn (its checks, limits and bookkeeping), awaited only briefly:
        # a refusal that comes at once is answered here, the rest of the start is
        # followed on the page through the progress events.
        spawning = asyncio.ensure_future(self.spawn_single_user(user, "", options=options))
        spawning.add_done_callback(_log_spawn_failure(self, template_id, user.name))
        await asyncio.wait({spawning}, timeout=QUICK_REFUSAL_SECONDS)
        if spawning.done() and spawning.exception() is not None:
            refusal = spawning.exception()
            if isinstance(refusal, web.HTTPError):
                message = refusal.log_message or refusal.reason
                return _json(self, refusal.status_code, {"message": message})
            message = str(refusal)[:500] or "The server did not start."
            return _json(self, 409, {"message": message})
        state = "ready" if spawner.ready else "starting"
        return _json(self, 200, {"state": state, "progress_url": progress_url})


async def copy_into_server(
    server_url: str, token: str, filename: str, text: str
) -> tuple[str, bool]:
    """Put ``text`` at ``filename`` in the server's home through its contents API.

    An identical file is reused; a different one (the user's own edits) is never
    overwritten: the copy gets the next free name (``name-2.ipynb``). Returns the path
    and whether it was written.
    """
    headers = {"Authorization": f"token {token}"}
    stem = filename[: -len(".ipynb")]
    want = hashlib.sha256(text.encode()).hexdigest()
    for n in range(1, 50):
        path = filename if n == 1 else f"{stem}-{n}.ipynb"
        url = f"{server_url}api/contents/{quote(path)}"
        found = await _http.get(
            url, params={"type": "file", "format": "text", "content": "1"}, headers=headers
        )
        if found.status_code == 200:
            if hashlib.sha256(found.json().get("content", "").encode()).hexdigest() == want:
                return path, False
            continue
        if found.status_code != 404:
            raise PortalUnavailable(f"Your server answered {found.status_code} to the copy.")
        put = await _http.put(
            url, json={"type": "file", "format": "text", "content": text}, headers=headers
        )
        if put.status_code not in (200, 201):
            raise PortalUnavailable(f"Your server refused the copy ({put.status_code}).")
        return path, True
    raise PortalUnavailable("Your home has too many copies of this template; remove some.")


class OneServerToken:
    """A hub token of ``user`` for their default server only, deleted on exit."""

    def __init__(self, handler: BaseHandler, user: Any, note: str) -> None:
        self.handler, self.user, self.note = handler, user, note
        self.value = ""

    def __enter__(self) -> str:
        self.value = self.user.new_api_token(
            note=self.note,
            expires_in=COPY_TOKEN_SECONDS,
            scopes=[f"access:servers!server={self.user.name}/"],
        )
        return self.value

    def __exit__(self, *_: Any) -> None:
        found = orm.APIToken.find(self.handler.db, self.value)
        if found is not None:
            self.handler.db.delete(found)
            self.handler.db.commit()


class CopyTemplate(BaseHandler):
    """Step two of Open on GPU: the notebook copied into the ready server."""

    @web.authenticated
    async def post(self, template_id: str) -> None:
        user = self.current_user
        template = await _template_or_answer(self, user, template_id)
        if template is None:
            return None
        spawner = user.spawners.get("")
        if spawner is None or not spawner.ready or spawner.server is None:
            return _json(self, 409, {"message": "Your server is not running yet."})
        try:
            with OneServerToken(self, user, "gpuportal template copy") as token:
                path, written = await copy_into_server(
                    spawner.server.url, token, template["filename"], template["notebook"]
                )
        except (PortalUnavailable, httpx.HTTPError) as exc:
            self.log.warning("template %s: copy for %s failed: %s", template_id, user.name, exc)
            message = (
                str(exc) if isinstance(exc, PortalUnavailable) else "Your server did not answer."
            )
            return _json(self, 502, {"message": message})
        self.log.info(
            "template %s: %s into %s's server",
            template_id,
            path if written else "reused",
            user.name,
        )
        return _json(self, 200, {"url": f"{user.url}lab/tree/{quote(path)}", "path": path})


def metadata_from_form(form: dict[str, str]) -> dict[str, Any]:
    """The publish form's metadata fields, typed; the portal validates the values."""

    def number(name: str, default: int) -> Any:
        text = form.get(name, "").strip()
        if not text:
            return default
        return int(text) if text.isdigit() else text

    return {
        "title": form.get("title", "").strip(),
        "description": form.get("description", "").strip(),
        "gpu_model": form.get("gpu_model", "").strip() or None,
        "gpu_count": number("gpu_count", 1),
        "min_vram_gb": number("min_vram_gb", 0),
        "expected_minutes": number("expected_minutes", 30),
    }


async def read_from_server(server_url: str, token: str, path: str) -> str:
    """The notebook's text from the user's server; a sentence when it cannot be."""
    headers = {"Authorization": f"token {token}"}
    url = f"{server_url}api/contents/{quote(path)}"
    info = await _http.get(url, params={"content": "0"}, headers=headers)
    if info.status_code == 404:
        raise ValueError(f"There is no notebook {path!r} in your server.")
    if info.status_code != 200:
        raise ValueError(f"Your server answered {info.status_code} for {path!r}.")
    size = info.json().get("size")
    if isinstance(size, int) and size > MAX_NOTEBOOK_BYTES:
        raise ValueError(
            f"{path} is {size} bytes; a template may be at most {MAX_NOTEBOOK_BYTES // 1024} KiB."
        )
    got = await _http.get(
        url, params={"type": "file", "format": "text", "content": "1"}, headers=headers
    )
    if got.status_code != 200:
        raise ValueError(f"Your server answered {got.status_code} for {path!r}.")
    return str(got.json().get("content", ""))


class Publish(BaseHandler):
    """A team admin publishes a notebook from their running server as a team template."""

    async def _page(self, status: int = 200, **values: Any) -> None:
        user = self.current_user
        teams: list[str] = []
        error = values.pop("error", None)
        try:
            teams = await reader().get(user, "templates-teams") or []
        except PortalUnavailable as exc:
            error = error or str(exc)
        spawner = user.spawners.get("")
        self.set_status(status)
        html = await self.render_template(
            "gallery_publish.html",
            user=user,
            teams=teams,
            error=error,
            form=values.get("form", {}),
            server_running=bool(spawner and spawner.ready),
            gallery=f"{self.hub.base_url}{GALLERY_PAGE}",
        )
        self.finish(html)

    @web.authenticated
    async def get(self) -> None:
        await self._page()

    @web.authenticated
    async def post(self) -> None:
        user = self.current_user
        fields = (
            "team",
            "path",
            "title",
            "description",
            "gpu_model",
            "gpu_count",
            "min_vram_gb",
            "expected_minutes",
        )
        form = {k: self.get_body_argument(k, "")[:600] for k in fields}
        path = form["path"].strip().lstrip("/")
        if not NOTEBOOK_PATH.fullmatch(path):
            return await self._page(
                400,
                form=form,
                error="Give the path of a notebook in your server, such as "
                "'work/train.ipynb' (no '..').",
            )
        if not form["team"]:
            return await self._page(400, form=form, error="Choose the team to publish to.")
        spawner = user.spawners.get("")
        if spawner is None or not spawner.ready or spawner.server is None:
            return await self._page(
                409, form=form, error="Start your server first: the notebook is read from it."
            )
        try:
            with OneServerToken(self, user, "gpuportal template publish") as token:
                text = await read_from_server(spawner.server.url, token, path)
            notebook = json.loads(text)
            if not isinstance(notebook, dict) or not isinstance(notebook.get("metadata"), dict):
                raise ValueError(f"{path} is not a Jupyter notebook.")
        except httpx.HTTPError:
            return await self._page(502, form=form, error="Your server did not answer.")
        except ValueError as exc:
            message = str(exc) if not isinstance(exc, json.JSONDecodeError) else None
            return await self._page(
                400, form=form, error=message or f"{path} is not a Jupyter notebook (not JSON)."
            )
        notebook["metadata"].setdefault("gpuportal", {})
        if isinstance(notebook["metadata"]["gpuportal"], dict):
            notebook["metadata"]["gpuportal"]["template"] = metadata_from_form(form)
        body = {"team": form["team"], "notebook": json.dumps(notebook, ensure_ascii=False)}
        try:
            done = await publisher().send(user, "POST", "templates", body)
        except PortalUnavailable as exc:
            return await self._page(400, form=form, error=str(exc))
        self.log.info("template %s published by %s for %s", done["id"], user.name, form["team"])
        said = f"Published {done['title']!r} for team {done['team']}."
        self.redirect(f"{self.hub.base_url}{GALLERY_PAGE}?{urlencode({'done': said})}")


HANDLERS = [
    (rf"/{GALLERY_PAGE}/?", Gallery),
    (rf"/{GALLERY_PAGE}/publish", Publish),
    (rf"/{GALLERY_PAGE}/open/((?:global|team)/[^/]+)", OpenTemplate),
    (rf"/{GALLERY_PAGE}/copy/((?:global|team)/[^/]+)", CopyTemplate),
]
