"""RaySpawner: each user server is a Ray job on a reserved provider GPU node.

The flow of a spawn (``start``):

1. the user's options are checked against ``profile_list`` (never trusted);
2. the marketplace reserves GPUs on one node (fail fast with a sentence);
3. a Ray job is submitted to that node's cluster through its Jobs API:
   entrypoint ``gpuportal-singleuser``, ``entrypoint_num_gpus``, and the
   reservation's custom resource ``gpuportal/node:<id>`` pinning it to the node;
   its runtime env carries only this server's ``JUPYTERHUB_*`` variables;
4. the wrapper on the node trades the job's one-time claim for this server's
   hub token (``report.py``: the token is never in the job's runtime env),
   starts ``jupyterhub-singleuser`` as the customer's own OS user on a free port
   and reports the port to the hub, authenticated with that token;
5. the reservation is activated and ``start`` returns the URL.

Any failure on the way stops the job and releases the reservation before a
``SpawnException`` with a sentence reaches the user. ``poll`` follows the job,
its node and the server's HTTP liveness; ``stop`` stops the job and releases
the reservation, idempotently. The ids live in the spawner state, so a hub
restart resumes running servers.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import shlex
import time
from pathlib import Path
from typing import Any

import httpx
from jupyterhub.spawner import Spawner, SpawnException
from traitlets import Bool, Float, Integer, List, TraitError, Unicode, default, validate
from traitlets import Dict as TDict

from gpuportal.provider import money, stopmarker
from gpuportal.provider.links import billing_url

from . import form, profiles, report, warm
from .loopclient import LoopClient
from .naming import escape, job_submission_id, oauth_client_id
from .portal_client import PortalClient, PortalError, PortalUnavailable
from .profiles import default_profile_list
from .rayjobs import JobNotFound, RayJobs, RayUnavailable
from .refusals import CREDIT_CODES, SpawnRefusal
from .report import expect_claim, forget_claim
from .singleuser import ENV_CLAIM, ENV_GPUS, ENV_IP, ENV_JOB_ID, ENV_READY_TIMEOUT
from .warm import POOLS, WarmUnavailable

# The one place the hub's report and claim handlers are registered: the hub loads
# its spawner class (``spawner_class = "ray"``) before it builds its handler table.
report.register()
warm.register()

__all__ = ["RaySpawner", "default_profile_list"]

#: How much of the node's ``gpuportal/node:<id>`` resource one server takes:
#: a sliver, so the resource only pins; the GPUs themselves are counted by Ray's GPU resource.
NODE_RESOURCE_AMOUNT = 0.001
#: The highest ``max_price`` the spawner accepts, in credits per GPU-hour.
MAX_PRICE_CREDITS = 10**6
#: The server's hub token never goes into a job's env (the wrapper claims it).
_TOKEN_VARS = frozenset({"JUPYTERHUB_API_TOKEN", "JPY_API_TOKEN"})
#: One Jobs API client per (cluster, token, timeout), shared by every spawner of the hub.
#: Keyed by the token's digest, never the token itself.
_JOBS_CLIENTS: dict[tuple[str, str, float], RayJobs] = {}
#: One portal client per (portal URL, token digest, timeout), shared likewise.
_PORTAL_CLIENTS: dict[tuple[str, str, float], PortalClient] = {}
#: One HTTP client per liveness timeout for the servers' liveness checks.
_LIVENESS_CLIENTS: dict[float, LoopClient] = {}
#: Version of the spawner state's layout, stored under STATE_VERSION_KEY (as KubeSpawner
#: stores ``kubespawner_version``). A state without it was written by version 0, whose
#: keys are the same; bump it when a key changes meaning, and convert in load_state.
STATE_VERSION = 1
STATE_VERSION_KEY = "rayspawner_state_version"
#: node_id is the marketplace's node; ray_node_id is Ray's id of the node the job runs on.
STATE_KEYS = (
    "jobs_url",
    "cluster_id",
    "job_id",
    "reservation_id",
    "node_id",
    "ray_node_id",
    "url",
    "gpus",
    # A server claimed from a node's warm pool: the pool's job, address and slot.
    "warm_job_id",
    "warm_url",
    "warm_slot",
)
#: Why the server last stopped on its own (a sentence from ``provider/stopmarker.py``).
#: Kept apart from STATE_KEYS: it outlives the ids, which clear_state drops.
STOPPED_REASON_KEY = "stopped_reason"
#: How much of the job's log poll() reads for the stop marker, characters.
STOP_LOG_CHARS = 4000
#: The longest stopped_reason kept (one read back from an old state too).
MAX_REASON_CHARS = 200


#: Hub groups that set a user's role (customers, providers, admins), not teams.
ROLE_GROUPS = frozenset({"customers", "providers", "admins"})


class RaySpawner(Spawner):
    """Place each single-user server in a Ray job on a reserved provider GPU node.

    Configure in ``jupyterhub_config.py``::

        c.JupyterHub.spawner_class = "ray"
        c.RaySpawner.portal_url = "http://127.0.0.1:8002/services/portal"
        c.RaySpawner.portal_token = open("ray-spawner-token").read().strip()
        c.RaySpawner.cpu_jobs_url = "http://127.0.0.1:8265"
    """

    # --- configuration ---------------------------------------------------------
    profile_list = List(
        TDict(),
        help="""Profiles offered in the spawn form and the REST API, in KubeSpawner's schema:
        display_name, slug, description, default, spawner_override (or kubespawner_override)
        and profile_options with choices / unlisted_choice. Example::

            c.RaySpawner.profile_list = [
                {"display_name": "1x A100", "slug": "a100",
                 "spawner_override": {"gpu_model": "A100-80GB", "gpu_count": 1}},
            ]
        """,
    ).tag(config=True)

    portal_url = Unicode(
        "http://127.0.0.1:8002/services/portal",
        help="Base URL of the portal service (its marketplace API lives under api/v1). "
        "Example: c.RaySpawner.portal_url = 'http://127.0.0.1:8002/services/portal'",
    ).tag(config=True)

    portal_token = Unicode(
        "",
        help="API token of the hub service the portal trusts to reserve for users "
        "(ray-spawner). Never logged, never sent to a node.",
    ).tag(config=True)

    portal_timeout = Float(10.0, help="Seconds one portal request may take.").tag(config=True)

    add_credit_url = Unicode(
        help="Where a user adds credit, as the browser reaches it: the spawn form and a "
        "refusal for credit link here. Default: the hub's billing page (/hub/billing "
        "under the default base URL). Example: c.RaySpawner.add_credit_url = "
        "'https://pay.example.org/'",
    ).tag(config=True)

    @default("add_credit_url")
    def _default_add_credit_url(self) -> str:
        # The hub's billing page (gpuportal.hub.pages), named once in provider/links.py.
        hub = getattr(self, "hub", None)
        return billing_url(getattr(hub, "base_url", None) or "/hub/")

    cpu_jobs_url = Unicode(
        "",
        help="Jobs API URL of the cluster that runs CPU-only servers (profiles with "
        "gpu_count 0). Empty: CPU-only servers are refused. "
        "Example: c.RaySpawner.cpu_jobs_url = 'http://127.0.0.1:8265'",
    ).tag(config=True)

    cpu_ray_token = Unicode(
        "",
        help="Ray token of the cpu_jobs_url cluster (Ray's token authentication). The "
        "tokens of GPU clusters come with each reservation. Never logged, never sent to "
        "a node. Example: c.RaySpawner.cpu_ray_token = open('ray-auth-token').read().strip()",
    ).tag(config=True)

    entrypoint = List(
        Unicode(),
        ["gpuportal-singleuser"],
        help="Command of the Ray job, run on the node; Spawner.args are appended. "
        "Example: c.RaySpawner.entrypoint = ['/opt/conda/bin/gpuportal-singleuser']",
    ).tag(config=True)

    connect_ip = Unicode(
        "",
        help="Host the hub connects to. Empty: Spawner.ip when it is a concrete address, "
        "else the node's IP as Ray reports it. The node never chooses it.",
    ).tag(config=True)

    env_allow = List(
        Unicode(),
        ["GPUPORTAL_PORTAL_URL", "GPUPORTAL_IDLE_TIMEOUT_SECONDS"],
        help="Names of extra environment variables (from Spawner.environment) that may "
        "reach the node. This server's JUPYTERHUB_* variables always do; nothing else. "
        "The defaults are what the server extension needs, and hold no secret: where "
        "the portal is and the GPU-aware idle limit.",
    ).tag(config=True)

    gpu_model = Unicode("", help="GPU model to reserve; empty: any.").tag(config=True)
    gpu_count = Integer(1, min=0, max=1024, help="GPUs to reserve; 0: a CPU-only server.").tag(
        config=True
    )
    min_vram_gb = Integer(0, min=0, help="Least VRAM per GPU, GiB; 0: any.").tag(config=True)
    region = Unicode("", help="Region to place in; empty: any.").tag(config=True)
    max_price = Unicode(
        "",
        help="Highest price per GPU-hour in credits, as a decimal string such as '2.00'; "
        "empty: no limit. Sent to the marketplace as integer micro-credits.",
    ).tag(config=True)
    min_reliability = Float(0.0, min=0.0, max=1.0, help="Least node reliability, 0..1.").tag(
        config=True
    )
    num_cpus = Float(
        0.0,
        min=0.0,
        help="CPUs the job reserves on the node (Ray's entrypoint_num_cpus); 0: none reserved.",
    ).tag(config=True)

    dead_after = Float(
        30.0,
        help="Bound, in seconds, from a server's node dying, its job failing or its server "
        "going silent to poll() reporting it gone. The poll interval defaults to a third "
        "of it. Example: c.RaySpawner.dead_after = 60",
    ).tag(config=True)

    ray_timeout = Float(10.0, help="Seconds one Ray Jobs API request may take.").tag(config=True)
    stop_timeout = Float(20.0, help="Seconds stop() waits for the job to end.").tag(config=True)
    liveness_timeout = Float(3.0, help="Seconds the HTTP liveness check may take.").tag(config=True)

    warm_pools = Bool(
        False,
        help="Claim a pre-started server from the reserved node's warm pool when it has "
        "one (a spawn in well under a second); a node without one starts cold and gets "
        "a pool in the background. Needs warm_secret. Example: c.RaySpawner.warm_pools = True",
    ).tag(config=True)

    warm_secret = Unicode(
        "",
        help="Secret the hub signs warm-pool requests with (each pool gets a key derived "
        "from it). Keep it across hub restarts: a restarted hub reaches its pools and "
        "their servers with it. Never logged, never sent to a node.",
    ).tag(config=True)

    warm_slots = Integer(
        0,
        min=0,
        help="Unclaimed servers each node's pool keeps waiting; 0: one per GPU the node "
        "has free when its pool starts, at most warm_slots_max. "
        "Example: c.RaySpawner.warm_slots = 2",
    ).tag(config=True)

    warm_slots_max = Integer(
        4,
        min=0,
        help="Most unclaimed servers a pool keeps waiting when warm_slots is 0; 0: none "
        "wait, and the pool starts each server as its spawn comes (no Ray job).",
    ).tag(config=True)

    warm_slots_per_node = TDict(
        help="Unclaimed servers per marketplace node id, overriding warm_slots. "
        "Example: c.RaySpawner.warm_slots_per_node = {'n1': 1}",
    ).tag(config=True)

    warm_timeout = Float(
        20.0,
        help="Seconds a claimed warm server may take to answer HTTP before the spawn "
        "falls back to a cold start on the same reservation.",
    ).tag(config=True)

    token_check_seconds = Integer(
        15,
        min=0,
        help="Seconds a user server may trust the hub's answer about a token or login "
        "(HubOAuth.cache_max_age; JupyterHub's own default is 300). A share that is "
        "revoked, or a member who leaves a team, loses access to the server within this "
        "time. 0: ask the hub on every request.",
    ).tag(config=True)

    def get_args(self) -> list[str]:
        """JupyterHub's server arguments, plus how long the server caches the hub's
        answer about a caller (so revoking a share takes effect quickly)."""
        return [*super().get_args(), f"--HubOAuth.cache_max_age={self.token_check_seconds}"]

    warm_entrypoint = List(
        Unicode(),
        help="Command of a node's warm pool job. Default: the Python next to the "
        "entrypoint, '-m gpuportal.provider.warmpool'.",
    ).tag(config=True)

    @default("warm_entrypoint")
    def _default_warm_entrypoint(self) -> list[str]:
        first = Path(self.entrypoint[0]) if self.entrypoint else Path("gpuportal-singleuser")
        python = str(first.parent / "python") if first.is_absolute() else "python3"
        return [python, "-m", "gpuportal.provider.warmpool"]

    @default("poll_interval")
    def _default_poll_interval(self) -> int:
        return max(1, int(self.dead_after / 3))

    @default("profile_list")
    def _default_profile_list(self) -> list[dict[str, Any]]:
        return default_profile_list()

    @validate("profile_list")
    def _check_profile_list(self, proposal: Any) -> list[dict[str, Any]]:
        try:
            return profiles.check_profile_list(list(proposal.value))
        except profiles.InvalidProfileList as exc:
            raise TraitError(f"RaySpawner.profile_list: {exc}") from None

    @validate("max_price")
    def _check_max_price(self, proposal: Any) -> str:
        value = str(proposal.value).strip()
        if value in ("", "any"):
            return ""
        refused = f"{value[:32]!r} is not a positive price with at most 6 decimals"
        try:
            micro = money.parse_credits(value)
        except money.NotAnAmount:
            raise TraitError(f"{value[:32]!r} is not a price such as 2.00") from None
        except money.TooManyDecimals:
            raise TraitError(refused) from None
        if micro <= 0 or micro > MAX_PRICE_CREDITS * money.MICRO:
            raise TraitError(refused)
        return value

    # --- runtime state (get_state/load_state) -----------------------------------
    jobs_url = ""
    cluster_id = ""
    job_id = ""
    reservation_id = ""
    node_id = ""
    ray_node_id = ""
    url = ""
    gpus = ""
    warm_job_id = ""
    warm_url = ""
    warm_slot = ""
    #: Why the server last stopped without the hub asking ("" when the hub stopped it,
    #: or it never stopped): shown by the hub's pages, cleared at the next start.
    stopped_reason = ""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        user = getattr(self, "user", None)
        if user is not None and isinstance(getattr(user, "name", None), str):
            # Before the hub registers the client: see naming.oauth_client_id.
            self.oauth_client_id = oauth_client_id(user.name, self.name or "")
        self._events: list[dict[str, Any]] = []
        #: Set (and replaced) on every event, so progress() wakes when the start moves.
        self._progress_wake = asyncio.Event()
        self._start_done = True
        self._report: asyncio.Future[tuple[int, str]] | None = None
        self._unreachable_since: float | None = None
        self._config_values: dict[str, Any] = {}
        self._options_applied = False
        self._ray_token: str | None = None
        self._claim_conflict = False
        self._last_refusal: dict[str, Any] | None = None
        #: The team that pays for this start ("Bill to"); None: the user's own wallet.
        self.bill_to: str | None = None
        #: Set by _poll_status when Ray says the job ended (not a dead node or silence).
        self._job_ended = False
        #: The reservation's GPU indices as CUDA_VISIBLE_DEVICES ("" before one).
        self._gpu_indices = ""

    # --- helpers ---------------------------------------------------------------
    def user_teams(self) -> list[str]:
        """The hub groups of the user that are teams (not role groups): whom the server
        may be billed to. The portal checks membership again at reservation."""
        groups = getattr(self.user, "groups", None) or []
        names = {getattr(g, "name", g) for g in groups}
        return sorted(str(n) for n in names if n and n not in ROLE_GROUPS)

    def bill_to_choices(self, portal_teams: Any) -> list[dict[str, Any]]:
        """ "Bill to" for the form: the user's teams (hub groups), each with what the
        portal says of it (its default profile; whether it can pay now, and why not).
        A team the portal does not know yet, or a portal that did not answer, leaves
        the team offered without those (the reservation checks it anyway)."""
        known: dict[str, dict[str, Any]] = {}
        if isinstance(portal_teams, list):
            known = {str(t.get("name")): t for t in portal_teams if isinstance(t, dict)}
        else:
            self.log.info("no teams for the spawn form of %s: %s", self._log_name, portal_teams)
        choices = []
        for name in self.user_teams():
            seen = known.get(name, {})
            choices.append(
                {
                    "name": name,
                    "default_profile": seen.get("default_profile") or None,
                    "can_pay": seen.get("can_pay", True) is not False,
                    "why": str(seen.get("why") or ""),
                }
            )
        return choices

    @property
    def portal(self) -> PortalClient:
        """The hub's one client of the portal (per URL, token and timeout)."""
        key = (self.portal_url.rstrip("/"), _digest(self.portal_token), self.portal_timeout)
        client = _PORTAL_CLIENTS.get(key)
        if client is None:
            client = _PORTAL_CLIENTS[key] = PortalClient(
                self.portal_url, self.portal_token, timeout=self.portal_timeout
            )
        return client

    async def _jobs(self) -> RayJobs:
        """The Jobs API of this server's cluster, with the cluster's Ray token: from the
        reservation (asked again after a hub restart; the token is never put in the
        spawner state) or ``cpu_ray_token`` for the CPU cluster."""
        if self._ray_token is None:
            if self.reservation_id and self.cluster_id != "cpu":
                try:
                    reservation = await self.portal.get(self.reservation_id)
                except PortalError as exc:
                    self.log.warning("%s: no Ray token for the cluster: %s", self._log_name, exc)
                    reservation = None
                if reservation is not None:
                    self._ray_token = reservation.ray_token
                token = self._ray_token or ""
            else:
                token = self._ray_token = self.cpu_ray_token
        else:
            token = self._ray_token
        key = (self.jobs_url, _digest(token), self.ray_timeout)
        jobs = _JOBS_CLIENTS.get(key)
        if jobs is None:
            # One client per cluster (the SDK's constructor makes a request itself).
            jobs = _JOBS_CLIENTS[key] = RayJobs(
                self.jobs_url, timeout=self.ray_timeout, token=token
            )
        return jobs

    def claim_conflict(self) -> None:
        """Someone presented this server's claim after it was used: the job was read
        by another party. The start fails rather than serve with that token."""
        self.log.error(
            "%s: the start-up claim of job %s was presented twice", self._log_name, self.job_id
        )
        self._claim_conflict = True

    @property
    def max_price_micro(self) -> int | None:
        return money.parse_credits(self.max_price) if self.max_price else None

    @property
    def _unreachable_grace(self) -> float:
        """How long the server may stay unreachable before poll() calls it gone,
        so that grace + one jittered poll interval + one check fit in dead_after."""
        spent = self.poll_interval * (1 + self.poll_jitter) + self.liveness_timeout
        return max(1.0, self.dead_after - spent)

    def _emit(self, progress: int, message: str) -> None:
        self.log.info("%s: %s", self._log_name, message)
        self._events.append({"progress": progress, "message": message})
        self._wake_progress()

    def _wake_progress(self) -> None:
        wake, self._progress_wake = self._progress_wake, asyncio.Event()
        wake.set()

    # --- user options -------------------------------------------------------------
    @default("options_from_form")
    def _default_options_from_form(self) -> Any:
        # Form fields to the same flat options the REST API takes; no side effects.
        return profiles.options_from_form

    def options_from_query(self, query_data: dict[str, Any]) -> dict[str, Any]:
        """``/hub/spawn?opt-profile=gpu&opt-gpu_count=2``: the flat REST options, as text."""
        options: dict[str, Any] = {}
        for key, value in query_data.items():
            if isinstance(value, list):
                value = value[0] if value else None
            if isinstance(value, bytes):
                value = value.decode(errors="replace")
            if isinstance(value, str):
                options[key] = value
        return options

    @default("options_form")
    def _default_options_form(self) -> Any:
        return RaySpawner._render_options_form

    @staticmethod
    async def _render_options_form(spawner: RaySpawner) -> str:
        if len(spawner.profile_list) <= 1 and not any(
            p.get("profile_options") for p in spawner.profile_list
        ):
            return ""
        offers_reply, balance_reply, teams_reply = await asyncio.gather(
            spawner.portal.offers(),
            spawner.portal.balance(spawner.user.name),
            spawner.portal.billing_teams(spawner.user.name),
            return_exceptions=True,
        )
        offers = offers_reply if isinstance(offers_reply, list) else None
        if offers is None:
            spawner.log.warning("offers unavailable for the spawn form: %s", offers_reply)
        balance = None if isinstance(balance_reply, BaseException) else balance_reply
        if isinstance(balance_reply, BaseException):
            spawner.log.info(
                "no balance for the spawn form of %s: %s", spawner._log_name, balance_reply
            )
        refusal = spawner._last_refusal
        selected: Any = spawner.user_options
        if refusal is not None:
            # Keep the profile, not the choices that were refused.
            selected = {"profile": refusal["profile"]} if refusal.get("profile") else {}
        return form.render(
            spawner.profile_list,
            offers,
            selected if isinstance(selected, dict) else {},
            balance=balance,
            refusal=refusal,
            add_credit_url=spawner.add_credit_url,
            teams=spawner.bill_to_choices(teams_reply),
        )

    @default("apply_user_options")
    def _default_apply_user_options(self) -> Any:
        # JupyterHub >= 5.3 runs this before start() and before it reads start_timeout,
        # so a profile may set start_timeout; a SpawnException here is the user's 400.
        return RaySpawner._apply_user_options_hook

    @staticmethod
    def _apply_user_options_hook(spawner: RaySpawner, user_options: Any) -> None:
        try:
            spawner._apply_options()
        except SpawnException as exc:
            spawner._remember_refusal(exc)
            raise
        spawner._options_applied = True

    def _remember_refusal(self, exc: SpawnException) -> None:
        """The next form shows that the last start was refused, without the choices
        that caused it (they are not kept silently for the next try)."""
        options = self.user_options if isinstance(self.user_options, dict) else {}
        profile = options.get("profile")
        self._last_refusal = {
            "profile": profile if isinstance(profile, str) else None,
            "credit": bool(getattr(exc, "credit", False)),
        }

    def _apply_options(self) -> profiles.Selection:
        """Validate user_options against profile_list and apply the chosen overrides.

        Overrides of an earlier spawn are undone first: the spawner object lives on
        between spawns of the same server.
        """
        for name, value in self._config_values.items():
            setattr(self, name, value)
        self._config_values = {}
        try:
            selection = profiles.select(self.profile_list, self.user_options)
        except profiles.InvalidOptions as exc:
            raise SpawnRefusal(str(exc), reason="invalid_options", status_code=400) from None
        self.bill_to = self._bill_to()
        traits = self.traits(config=True)
        for name, value in selection.overrides.items():
            trait = traits.get(name)
            if trait is None:
                self.log.error(
                    "profile %s overrides unknown RaySpawner trait %s", selection.profile, name
                )
                raise SpawnRefusal(
                    "This profile is misconfigured; tell the administrator.",
                    reason="bad_profile",
                    status_code=500,
                )
            self._config_values.setdefault(name, getattr(self, name))
            try:
                if isinstance(value, str) and not isinstance(trait, Unicode):
                    value = trait.from_string(value)
                setattr(self, name, value)
            except (TraitError, ValueError) as exc:
                raise SpawnRefusal(
                    f"{str(value)[:64]!r} is not a valid {name}: {str(exc)[:200]}",
                    reason="invalid_options",
                    status_code=400,
                ) from None
        return selection

    def _bill_to(self) -> str | None:
        """The team named by the ``bill_to`` option, if the user is in it; a crafted name
        of a team the user is not in is refused (the portal checks it again)."""
        options = self.user_options if isinstance(self.user_options, dict) else {}
        value = options.get(profiles.BILL_TO)
        if value in (None, ""):
            return None
        if not isinstance(value, str) or value not in self.user_teams():
            raise SpawnRefusal(
                f"You are not a member of team {str(value)[:64]!r}, so it cannot pay for this "
                "server; bill it to your own wallet or to one of your teams.",
                reason="not_a_team_member",
                status_code=403,
            )
        return value

    def job_env(self, claim: str = "") -> dict[str, str]:
        """The job's env: this server's JUPYTERHUB_* plus the admin's allow-list, and the
        one-time claim for its token. Never the token itself: a job's runtime env is
        shown to whoever may list jobs."""
        env = self.get_env()
        allowed = {
            k: str(v)
            for k, v in env.items()
            if (k.startswith("JUPYTERHUB_") or k in self.env_allow) and k not in _TOKEN_VARS
        }
        allowed[ENV_IP] = self.ip or "0.0.0.0"
        allowed[ENV_JOB_ID] = self.job_id
        allowed[ENV_READY_TIMEOUT] = str(int(self.start_timeout))
        if self._gpu_indices:
            # The marketplace's GPUs, the same ones a warm server gets (not Ray's choice).
            allowed[ENV_GPUS] = self._gpu_indices
        if claim:
            allowed[ENV_CLAIM] = claim
        return allowed

    # --- the spawner contract ------------------------------------------------------
    async def start(self) -> str:
        self._events = []
        self.stopped_reason = ""
        self._start_done = False
        try:
            url = await self._start()
            self._last_refusal = None
            return url
        except SpawnException as exc:
            self._remember_refusal(exc)
            raise
        finally:
            self._start_done = True
            self._wake_progress()
            self._report = None
            forget_claim(self.job_id)

    async def _start(self) -> str:
        if not self._options_applied:  # JupyterHub < 5.3, or a custom apply hook
            self._apply_options()
        self._options_applied = False
        self.clear_ids()
        self._ray_token = None
        self._claim_conflict = False
        self._gpu_indices = ""
        self.job_id = job_submission_id(self.user.name, self.name)
        self._report = asyncio.get_running_loop().create_future()
        self._unreachable_since = None
        try:
            resources: dict[str, float] = {}
            if self.gpu_count > 0:
                reservation = await self._reserve()
                self.reservation_id = reservation.id
                self.jobs_url = reservation.jobs_url
                self.cluster_id = reservation.cluster_id
                self.node_id = reservation.node_id
                self._ray_token = reservation.ray_token
                resources[reservation.node_resource] = NODE_RESOURCE_AMOUNT
                self._gpu_indices = ",".join(str(i) for i in reservation.gpu_indices)
                demo = " (demo GPU)" if reservation.demo else ""
                self._emit(
                    10,
                    f"Reserved {reservation.gpu_count}x {reservation.gpu_model}"
                    f"{demo} on node {reservation.node_id[:12]} in "
                    f"{reservation.region} at "
                    f"{money.format_credits(reservation.price_per_gpu_hour)} "
                    "credits per GPU-hour",
                )
            else:
                if not self.cpu_jobs_url:
                    raise SpawnRefusal(
                        "CPU-only servers are not offered here; choose a GPU profile.",
                        reason="no_cpu_cluster",
                    )
                self.jobs_url = self.cpu_jobs_url
                self.cluster_id = "cpu"
                self._emit(10, "No GPU requested: placing a CPU-only server")
            if self.reservation_id and self.warm_pools and self.warm_secret:
                warm_url = await self._start_warm(reservation)
                if warm_url:
                    return warm_url
            await self._submit(resources)
            self._emit(30, f"Submitted Ray job {self.job_id}")
            port, gpus = await self._wait_for_report()
            self.gpus = gpus
            host = await self._connect_host()
            self.url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
            if self.reservation_id:
                await self._activate()
            shown = f" with CUDA_VISIBLE_DEVICES={gpus}" if gpus else ""
            self._emit(90, f"Server up on node {(self.node_id or self.ray_node_id)[:12]}{shown}")
            return self.url
        except asyncio.CancelledError:
            self.log.warning(
                "%s: start cancelled (start_timeout %ss?); cleaning up",
                self._log_name,
                self.start_timeout,
            )
            await self._cleanup()
            raise
        except SpawnException as exc:
            await self._cleanup(failed=getattr(exc, "reason", None) or "start failed")
            raise
        except Exception:
            self.log.exception("%s: start failed", self._log_name)
            await self._cleanup(failed="internal error while starting")
            raise SpawnRefusal(
                "Your server could not be started because of an internal error; it has been "
                "logged. Try again in a minute.",
                reason="error",
                status_code=500,
            ) from None

    async def _reserve(self) -> Any:
        try:
            return await self.portal.reserve(
                user=self.user.name,
                server_name=self.name,
                gpu_count=self.gpu_count,
                gpu_model=self.gpu_model or None,
                min_vram_gb=self.min_vram_gb or None,
                region=self.region or None,
                max_price=self.max_price_micro,
                min_reliability=self.min_reliability or None,
                team=self.bill_to,
            )
        except PortalUnavailable as exc:
            raise SpawnRefusal(exc.message, reason="portal_unavailable", status_code=503) from None
        except PortalError as exc:
            status = exc.status if 400 <= exc.status < 500 else 500
            message = exc.message
            if exc.code == "no_capacity":
                message = f"{message.rstrip()} {await self._free_now()}".rstrip()
            credit = exc.code in CREDIT_CODES
            raise SpawnRefusal(
                message,
                reason=exc.code or "refused",
                status_code=status,
                link=(self.add_credit_url, "Add credit") if credit else None,
                credit=credit,
            ) from None

    async def _free_now(self) -> str:
        """What is free, for a refusal for capacity (empty if the portal cannot say)."""
        try:
            return form.free_now(await self.portal.offers())
        except PortalError:
            return ""

    async def _submit(self, resources: dict[str, float]) -> None:
        entrypoint = shlex.join([*self.entrypoint, *self.get_args()])
        claim = secrets.token_urlsafe(32)
        expect_claim(self.job_id, claim, self)
        jobs = await self._jobs()
        try:
            await jobs.submit(
                submission_id=self.job_id,
                entrypoint=entrypoint,
                num_cpus=self.num_cpus,
                num_gpus=float(self.gpu_count),
                resources=resources,
                env_vars=self.job_env(claim),
                metadata={
                    "gpuportal_user": self.user.name[:255],
                    "gpuportal_server": self.name[:255],
                    "gpuportal_reservation": self.reservation_id,
                },
            )
        except RayUnavailable as exc:
            self.log.warning("%s: submit failed: %s", self._log_name, exc)
            raise SpawnRefusal(
                "The GPU provider's cluster is not answering; try again "
                "in a minute or choose another GPU.",
                reason="ray_unavailable",
                status_code=503,
            ) from None

    # --- warm pools ------------------------------------------------------------------
    async def _start_warm(self, reservation: Any) -> str | None:
        """Claim a server from the reserved node's warm pool and return its URL; None
        to start cold on the same reservation (nothing is billed twice: the
        reservation is only activated once a server is up). A node without a ready
        pool gets one in the background, for the next spawn."""
        jobs = await self._jobs()
        pool = POOLS.ready(self.jobs_url, self.node_id)
        if pool is None:
            POOLS.ensure(
                jobs,
                self.node_id,
                secret=self.warm_secret,
                host=self._host_of,
                node_resource=reservation.node_resource,
                slots=lambda: self._warm_slot_count(reservation),
                ip=self.ip or "0.0.0.0",
                entrypoint=shlex.join(self.warm_entrypoint),
                bound=self.dead_after,
            )
            return None
        POOLS.watch(pool, jobs, self.dead_after)
        fields = {
            "user": self.user.name,
            "env": self.job_env(),
            "token": self.api_token,
            "gpus": self._gpu_indices,
            "args": list(self.get_args()),
            # No slot waiting: the pool starts one for this claim, within this bound
            # (then it gives up and this spawn starts cold, through a Ray job).
            "wait": max(1.0, self.warm_timeout - 2.0),
        }
        try:
            answer = await POOLS.request(
                pool.address, pool.job_id, self.warm_secret, "claim", fields, self.warm_timeout
            )
            port, slot = answer.get("port"), answer.get("slot")
            if not isinstance(port, int) or not 1 <= port <= 65535 or not isinstance(slot, str):
                raise WarmUnavailable("the pool's answer has no port")
        except WarmUnavailable as exc:
            self.log.info("%s: no warm server on node %s (%s)", self._log_name, self.node_id, exc)
            if not await POOLS.pool_alive(jobs, pool.job_id):
                POOLS.forget(pool, "its job or node is gone")
            return None
        cold_job_id, self.job_id = self.job_id, ""  # no Ray job of its own
        self.warm_job_id, self.warm_url, self.warm_slot = pool.job_id, pool.address, slot
        self.ray_node_id, self.gpus = pool.ray_node_id, self._gpu_indices
        if answer.get("started"):
            self._emit(50, f"Started a server on node {self.node_id[:12]} (none was waiting)")
        else:
            self._emit(50, f"Claimed a warm server on node {self.node_id[:12]}")
        host = await self._host_of(pool.ray_node_id)
        self.url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        deadline = time.monotonic() + self.warm_timeout
        while not await self._answers():
            if time.monotonic() > deadline:
                self.log.warning("%s: warm server did not answer; starting cold", self._log_name)
                await self._stop_warm()
                self.warm_job_id = self.warm_url = self.warm_slot = self.url = ""
                self.job_id = cold_job_id
                return None
            await asyncio.sleep(0.05)
        await self._activate()
        shown = f"Server up on node {self.node_id[:12]} with CUDA_VISIBLE_DEVICES={self.gpus}"
        self._emit(90, shown)
        return self.url

    async def _warm_slot_count(self, reservation: Any) -> int:
        """Slots for the node's pool: the per-node setting, else warm_slots, else one
        per GPU the node has free (as far as the offers tell), at most warm_slots_max."""
        per_node = self.warm_slots_per_node.get(self.node_id)
        if per_node is not None:
            return max(0, int(per_node))
        if self.warm_slots:
            return self.warm_slots
        try:
            offers = await self.portal.offers()
        except PortalError:
            offers = []
        free = max(
            (
                int(o.get("largest_free_gpus") or 0)
                for o in offers
                if o.get("gpu_model") == reservation.gpu_model
            ),
            default=0,
        )
        return min(self.warm_slots_max, max(1, free + reservation.gpu_count))

    async def _stop_warm(self) -> None:
        """Ask the pool to end this server; a pool that does not answer is gone with it."""
        try:
            await POOLS.request(
                self.warm_url,
                self.warm_job_id,
                self.warm_secret,
                "stop",
                {"slot": self.warm_slot},
                self.stop_timeout,
            )
        except WarmUnavailable as exc:
            self.log.warning("%s: could not stop warm server: %s", self._log_name, exc)

    async def _poll_warm(self) -> int | None:
        try:
            answer = await POOLS.request(
                self.warm_url,
                self.warm_job_id,
                self.warm_secret,
                "status",
                {"slot": self.warm_slot},
                self.liveness_timeout,
            )
        except WarmUnavailable:
            try:
                alive = await POOLS.pool_alive(await self._jobs(), self.warm_job_id)
            except RayUnavailable:
                return self._unknown("the cluster's Jobs API is not answering")
            if not alive:
                self.log.warning("%s: the warm pool's job or node is gone", self._log_name)
                pool = POOLS.pools.get((self.jobs_url, self.node_id))
                if pool is not None and pool.job_id == self.warm_job_id:
                    POOLS.forget(pool, "its job or node is gone")
                return 1
            return self._unknown("the warm pool does not answer")
        if not answer.get("slot_alive"):
            self.log.warning("%s: the warm server has exited", self._log_name)
            return 0
        if self.url and not await self._answers():
            return self._unknown("the server does not answer")
        self._unreachable_since = None
        return None

    async def _wait_for_report(self) -> tuple[int, str]:
        """Wait for the wrapper's report while following the job; bounded by start_timeout
        (the hub cancels start() then) and by our own deadline as a backstop."""
        assert self._report is not None
        jobs = await self._jobs()
        deadline = time.monotonic() + self.start_timeout + 5
        scheduled = False
        unavailable_since: float | None = None
        while time.monotonic() < deadline:
            done, _ = await asyncio.wait({self._report}, timeout=1.0)
            if self._claim_conflict:
                raise SpawnRefusal(
                    "Your server's start-up credentials were requested twice, so it was "
                    "stopped for your safety; start it again.",
                    reason="claim_conflict",
                    status_code=500,
                )
            if done and scheduled:
                return self._report.result()
            try:
                state = await jobs.state(self.job_id)
            except (RayUnavailable, JobNotFound) as exc:
                now = time.monotonic()
                unavailable_since = unavailable_since or now
                if now - unavailable_since > self.dead_after:
                    self.log.warning("%s: cluster lost while starting: %s", self._log_name, exc)
                    raise SpawnRefusal(
                        "The GPU provider's cluster stopped answering while "
                        "your server was starting; try again.",
                        reason="ray_unavailable",
                        status_code=503,
                    ) from None
                continue
            unavailable_since = None
            if state.terminal:
                tail = await jobs.logs_tail(self.job_id)
                self.log.warning(
                    "%s: job %s ended %s before the server was ready: %s\n%s",
                    self._log_name,
                    self.job_id,
                    state.status,
                    state.message[:300],
                    tail,
                )
                raise SpawnRefusal(
                    f"Your server exited before it was ready (Ray job {state.status.lower()}). "
                    "The details are in the hub log; try again or choose another GPU.",
                    reason="job_failed",
                    status_code=500,
                )
            if state.status == "RUNNING" and not scheduled:
                scheduled = True
                self.ray_node_id = state.node_id
                self._emit(
                    50,
                    f"Scheduled on Ray node {state.node_id[:12]}; starting Jupyter",
                )
        raise SpawnRefusal("Your server did not report in time.", reason="timeout", status_code=500)

    def accept_report(self, body: dict[str, Any]) -> None:
        """Called by the report handler for this server's token; ValueError → 400."""
        if self._report is None or self._report.done():
            raise ValueError("This server is not waiting for a report.")
        if body.get("job_id") != self.job_id:
            raise ValueError("The report names another job.")
        port = body.get("port")
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise ValueError("port must be an integer between 1 and 65535.")
        gpus = body.get("gpus", "")
        if (
            not isinstance(gpus, str)
            or len(gpus) > 512
            or not all(c.isalnum() or c in ",-" for c in gpus)
        ):
            raise ValueError("gpus must be a CUDA_VISIBLE_DEVICES value.")
        self._report.set_result((port, gpus))

    async def _connect_host(self) -> str:
        return await self._host_of(self.ray_node_id)

    async def _host_of(self, ray_node_id: str) -> str:
        """The host the hub reaches a process on that Ray node at (never the node's say)."""
        if self.connect_ip:
            return self.connect_ip
        if self.ip and self.ip not in ("0.0.0.0", "::"):
            return self.ip
        node_ip = None
        if ray_node_id:
            try:
                node_ip = await (await self._jobs()).node_ip(ray_node_id)
            except RayUnavailable:
                node_ip = None
        if not node_ip:
            raise SpawnRefusal(
                "The server's node has no address the hub can reach.",
                reason="no_address",
                status_code=500,
            )
        return node_ip

    async def _activate(self) -> None:
        try:
            await self.portal.activate(self.reservation_id)
        except PortalError as exc:
            self.log.warning(
                "%s: activating reservation %s failed: %s",
                self._log_name,
                self.reservation_id,
                exc.code,
            )
            raise SpawnRefusal(
                "The marketplace could not confirm your GPUs; the server was stopped. "
                + exc.message,
                reason="activate_failed",
                status_code=503,
            ) from None

    async def _cleanup(self, failed: str | None = None) -> None:
        """Stop the job and release the reservation; each step bounded and logged.

        ``failed``: the start failed after a reservation was made, so the node is
        told about it (``/failed``), which counts against its reliability.
        """
        try:
            await asyncio.wait_for(self._stop_and_release(failed), self.stop_timeout + 30)
        except Exception:
            self.log.exception("%s: cleanup after a failed start was incomplete", self._log_name)

    async def _stop_and_release(self, failed: str | None = None) -> None:
        if self.warm_slot and self.warm_url:
            await self._stop_warm()
        if self.job_id and self.jobs_url:
            await self._stop_job()
        if self.reservation_id and failed:
            try:
                await self.portal.failed(self.reservation_id, failed)
            except PortalError as exc:
                self.log.warning(
                    "%s: could not report the failed start of reservation %s: %s",
                    self._log_name,
                    self.reservation_id,
                    exc.code,
                )
        if self.reservation_id:
            try:
                released = await self.portal.release(self.reservation_id)
                self.log.info(
                    "%s: reservation %s %s",
                    self._log_name,
                    self.reservation_id,
                    "released" if released else "was already released",
                )
            except PortalError as exc:
                # Logged loudly for the operator; the hub must still be able to
                # forget the server, and a retry of stop() would not know the id.
                self.log.error(
                    "%s: could not release reservation %s: %s",
                    self._log_name,
                    self.reservation_id,
                    exc.code,
                )
        self.clear_ids()

    async def _stop_job(self) -> None:
        """Stop the job and wait, within stop_timeout, until Ray says it ended.

        A job that already ended (its node died, say) is not stopped again: on a
        dead node that call would only wait for a timeout while the GPUs stay booked.
        """
        jobs = await self._jobs()
        deadline = time.monotonic() + self.stop_timeout
        try:
            state = await jobs.state(self.job_id)
            if state.terminal:
                return
            if state.node_id and not await jobs.node_alive(state.node_id):
                self.log.warning("%s: node of job %s is dead", self._log_name, self.job_id)
                return
            await jobs.stop(self.job_id)
            while time.monotonic() < deadline:
                await asyncio.sleep(0.5)
                if (await jobs.state(self.job_id)).terminal:
                    return
            self.log.warning(
                "%s: job %s did not end within %ss", self._log_name, self.job_id, self.stop_timeout
            )
        except JobNotFound:
            return
        except RayUnavailable as exc:
            # The cluster or the node is gone, and the job with it.
            self.log.warning("%s: could not stop job %s: %s", self._log_name, self.job_id, exc)

    async def stop(self, now: bool = False) -> None:
        """Stop the job, wait for it within stop_timeout, release the reservation.

        Idempotent: a second call finds nothing left to do.
        """
        if self._report is not None and not self._report.done():
            self._report.cancel()
        self.stopped_reason = ""  # the hub (or the meter through it) stopped it
        await self._stop_and_release()

    async def poll(self) -> int | None:
        """None while the job runs, its node is alive and the server answers.

        An exit status once the job ended (0 only for success), the node is dead or
        unknown, or the server (or cluster) stayed unreachable for the grace
        period. With the defaults the whole bound is ``dead_after`` (30 s).

        A server found gone is cleaned up here, at once: JupyterHub calls stop()
        only for servers that poll() says are running, so this is where the job
        of a dead server is stopped and its reservation released.
        """
        self._job_ended = False
        status = await self._poll_status()
        if status is not None and (self.job_id or self.reservation_id) and self._start_done:
            if self._job_ended and self.job_id:
                await self._record_stop_reason()
            await self._cleanup()
        return status

    async def _record_stop_reason(self) -> None:
        """The job ended though the hub did not stop it: read why from the last stop
        marker in its log's tail (bounded in time and size; a failure is logged and
        leaves "stopped on its own"). The sentence comes from stopmarker's allow-list,
        never from the log itself."""
        tail = ""
        try:
            jobs = await self._jobs()
            tail = await asyncio.wait_for(
                jobs.logs_tail(self.job_id, chars=STOP_LOG_CHARS), self.ray_timeout * 2 + 1
            )
        except Exception as exc:
            self.log.warning(
                "%s: could not read the log of job %s: %s",
                self._log_name,
                self.job_id,
                type(exc).__name__,
            )
        self.stopped_reason = stopmarker.stop_reason(tail)[:MAX_REASON_CHARS]
        self.log.info("%s: stopped because %s", self._log_name, self.stopped_reason)

    async def _poll_status(self) -> int | None:
        if not self._start_done:
            return None
        if self.warm_slot and self.warm_url:
            return await self._poll_warm()
        if not self.job_id or not self.jobs_url:
            return 0
        jobs = await self._jobs()
        try:
            state = await jobs.state(self.job_id)
        except JobNotFound:
            self.log.warning("%s: job %s is unknown to its cluster", self._log_name, self.job_id)
            return 1
        except RayUnavailable:
            return self._unknown("the cluster's Jobs API is not answering")
        if state.terminal:
            self._job_ended = True
            self.log.warning(
                "%s: job %s is %s: %s",
                self._log_name,
                self.job_id,
                state.status,
                state.message[:300],
            )
            return 0 if state.status == "SUCCEEDED" else 1
        node_id = state.node_id or self.ray_node_id
        if node_id:
            try:
                alive = await jobs.node_alive(node_id)
            except RayUnavailable:
                return self._unknown("the cluster's state API is not answering")
            if not alive:
                self.log.warning("%s: node %s is dead", self._log_name, node_id)
                return 1
        if self.url and not await self._answers():
            return self._unknown("the server does not answer")
        self._unreachable_since = None
        return None

    def _unknown(self, why: str) -> int | None:
        now = time.monotonic()
        if self._unreachable_since is None:
            self._unreachable_since = now
        silent = now - self._unreachable_since
        if silent >= self._unreachable_grace:
            self.log.warning("%s: gone: %s for %.0fs", self._log_name, why, silent)
            return 1
        self.log.info("%s: %s (%.0fs so far)", self._log_name, why, silent)
        return None

    async def _answers(self) -> bool:
        base = self.server.base_url if self.server else "/"
        http = _LIVENESS_CLIENTS.get(self.liveness_timeout)
        if http is None:
            http = _LIVENESS_CLIENTS[self.liveness_timeout] = LoopClient(
                timeout=self.liveness_timeout
            )
        try:
            await http.get(f"{self.url}{base}api")
        except httpx.HTTPError:
            return False
        return True

    async def progress(self) -> Any:
        """Yield reserved → submitted → scheduled → server up, as start() emits them.

        Follows the start's events: each ``_emit`` wakes every reader (the spawn page
        may open more than one event stream), so an event is sent when it happens.
        Bounded by start_timeout, after which the hub has cancelled the start anyway.
        """
        seen = 0
        deadline = time.monotonic() + self.start_timeout + 10
        while True:
            wake = self._progress_wake  # taken before reading, so no event is missed
            while seen < len(self._events):
                yield self._events[seen]
                seen += 1
            left = deadline - time.monotonic()
            if self._start_done or left <= 0:
                break
            try:
                await asyncio.wait_for(wake.wait(), timeout=left)
            except TimeoutError:
                break

    async def get_url(self) -> str:
        if self.url and self.server:
            return f"{self.url}{self.server.base_url}"
        return str(await super().get_url())

    def template_namespace(self) -> dict[str, Any]:
        """Adds ``{user_key}``: the user name escaped to ``[a-z0-9_]``, safe in paths."""
        namespace: dict[str, Any] = super().template_namespace()
        namespace["user_key"] = escape(self.user.name)
        return namespace

    # --- state ---------------------------------------------------------------------
    def clear_ids(self) -> None:
        for key in STATE_KEYS:
            setattr(self, key, "")
        self._ray_token = None

    def get_state(self) -> dict[str, Any]:
        state: dict[str, Any] = super().get_state()
        for key in STATE_KEYS:
            value = getattr(self, key)
            if value:
                state[key] = value
        if self.stopped_reason:
            state[STOPPED_REASON_KEY] = self.stopped_reason
        if any(key in state for key in (*STATE_KEYS, STOPPED_REASON_KEY)):
            state[STATE_VERSION_KEY] = STATE_VERSION
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        version = state.get(STATE_VERSION_KEY, 0)
        if not isinstance(version, int) or version > STATE_VERSION:
            # Written by a newer spawner (a downgrade): its keys may mean something else.
            self.log.warning(
                "%s: state version %r is newer than %s; reading the keys it shares",
                self._log_name,
                version,
                STATE_VERSION,
            )
        for key in STATE_KEYS:
            if key in state:
                setattr(self, key, str(state[key]))
        self.stopped_reason = str(state.get(STOPPED_REASON_KEY) or "")[:MAX_REASON_CHARS]
        if self.warm_slot:
            POOLS.remember(
                self.jobs_url,
                self.node_id,
                self.warm_job_id,
                self.warm_url,
                self.warm_secret,
                self.ray_node_id,
                self.dead_after,
            )

    def clear_state(self) -> None:
        super().clear_state()
        self.clear_ids()
        self._unreachable_since = None
        # stopped_reason stays: the hub clears the state right after a server stops,
        # and the pages show the reason until the next start.


def _digest(token: str) -> str:
    """A cache key for a credential: its digest, so no token sits in a dict's keys."""
    return hashlib.sha256(token.encode()).hexdigest()
