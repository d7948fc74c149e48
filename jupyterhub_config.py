# gpuportal: the embedded default deployment, on one machine.
#
#   gpuportal up                      # what `make run` does: Ray + this hub + the portal
#   jupyterhub -f jupyterhub_config.py   # the hub alone (Ray already running)
#
# Every value below comes from a GPUPORTAL_* environment variable, read and
# validated by gpuportal.hub.settings (the README's configuration table lists
# them all). The default is given next to each. Nothing here listens on
# anything but 127.0.0.1.
# (`c` and `load_subconfig` are injected by JupyterHub's config loader.)

import os
import secrets
import shutil
import sys
from pathlib import Path

from gpuportal.hub.errors import ConfigError
from gpuportal.hub.settings import load_settings
from gpuportal.hub.stack import dashboards
from gpuportal.hub.stack.admin import ensure_admin, extra_admins, passwords_dbm
from gpuportal.hub.stack.datadir import secure_data_dir

try:
    gp = load_settings()
except ConfigError as exc:  # one clear line, no traceback wall
    print(f"gpuportal: {exc}", file=sys.stderr)
    sys.exit(2)

data = gp.data_dir  # GPUPORTAL_DATA_DIR, default ./.gpuportal
# The data dir holds every secret of the control plane: 0700, its files 0600,
# and this process's umask 0077, whatever the shell's.
secure_data_dir(data)
(gp.run_dir).mkdir(parents=True, exist_ok=True)
(gp.logs_dir).mkdir(parents=True, exist_ok=True)

# --- Network ---------------------------------------------------------------
# The public portal (the proxy): GPUPORTAL_PORT, default 8000.
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = gp.port
# The hub process itself: GPUPORTAL_HUB_PORT, default 8081.
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = gp.hub_port
# The proxy's REST API: GPUPORTAL_PROXY_API_PORT, default 8001.
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{gp.proxy_api_port}"
c.ConfigurableHTTPProxy.pid_file = str(gp.run_dir / "jupyterhub-proxy.pid")


# configurable-http-proxy: Node's when one is on PATH (outside this Python
# environment), else the PyPI port installed with gpuportal, mended to answer
# websocket subprotocols (kernels connect through it) and to stream responses (the
# spawn progress page's events arrive as they happen): gpuportal/hub/stack/proxy.py.
def _proxy_command() -> list[str]:
    venv_bin = Path(sys.executable).parent
    path = os.pathsep.join(
        p for p in os.environ.get("PATH", "").split(os.pathsep) if Path(p) != venv_bin
    )
    node_chp = shutil.which("configurable-http-proxy", path=path)
    if node_chp and shutil.which("node"):
        return [node_chp]
    return [sys.executable, "-m", "gpuportal.hub.stack.proxy"]


c.ConfigurableHTTPProxy.command = _proxy_command()

# --- State, all inside the data dir ----------------------------------------
c.JupyterHub.db_url = f"sqlite:///{data / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(data / "jupyterhub_cookie_secret")
c.JupyterHub.pid_file = str(gp.run_dir / "jupyterhub.pid")

# --- Authentication ----------------------------------------------------------
# GPUPORTAL_AUTHENTICATOR, default "firstuse": passwords as in The Littlest
# JupyterHub, accounts made on the sign-up page. Any Authenticator class works, e.g.
#   GPUPORTAL_AUTHENTICATOR=oauthenticator.github.GitHubOAuthenticator
#   GPUPORTAL_AUTHENTICATOR=oauthenticator.generic.GenericOAuthenticator
# with its own settings in GPUPORTAL_HUB_EXTRA_CONFIG (see docs/authentication.md).
if gp.authenticator == "firstuse":
    c.JupyterHub.authenticator_class = "gpuportal.hub.pages.signup.SignupAuthenticator"
    c.FirstUseAuthenticator.dbm_path = str(passwords_dbm(data))
    # Logging in never creates an account: sign-up is its own page (/hub/signup),
    # password typed twice (gpuportal.hub.pages.signup.SignupAuthenticator).
    c.FirstUseAuthenticator.create_users = False
    # GPUPORTAL_MIN_PASSWORD_LENGTH, default 8.
    c.FirstUseAuthenticator.min_password_length = gp.min_password_length
    c.Authenticator.allow_all = True
    # The admin (GPUPORTAL_ADMIN_USER, default "admin") can log in from the
    # first start, with GPUPORTAL_ADMIN_PASSWORD or a generated password.
    _generated = ensure_admin(
        data,
        gp.admin_user,
        gp.admin_password.get_secret_value() if gp.admin_password else None,
        gp.min_password_length,
    )
    if _generated:
        print(
            f"gpuportal: created hub admin {gp.admin_user!r} with password {_generated}"
            f" (saved 0600 in {data / 'admin-password'}; shown only once)",
            file=sys.stderr,
        )
else:
    c.JupyterHub.authenticator_class = gp.authenticator
# Admins: GPUPORTAL_ADMIN_USER plus any added with `gpuportal admin create`.
_admins = {gp.admin_user} | extra_admins(data)
c.Authenticator.admin_users = _admins

# --- Hub pages: money on every page, /hub/billing, branded login, sign-up ------
# (gpuportal.hub.pages: templates extend JupyterHub's own; data from the portal API,
# read as the logged-in user.)
from gpuportal.hub.pages import configure as configure_pages  # noqa: E402

# /hub/dashboards (gpuportal.dashboards) lists the dashboards for each user's role; its
# link sits in the pages' navigation bar.
_dashboard_handlers, _dashboard_templates = dashboards.hub_page()
configure_pages(
    c,
    gp,
    firstuse=gp.authenticator == "firstuse",
    extra_handlers=_dashboard_handlers,
    extra_templates=[_dashboard_templates],
)

# --- Groups and roles (least privilege) --------------------------------------
# Role groups: membership sets a portal account's role (admin > provider > customer).
c.JupyterHub.load_groups = {
    "customers": {"users": []},
    "providers": {"users": []},
    "admins": {"users": sorted(_admins)},
}
_portal_access = "access:services!service=portal"
# A read-only custom scope for the hub's warm-pool view (docs/spawner.md): the
# portal's health shows each node's warm slots with it, without admin:servers.
from gpuportal.spawners.warm import CUSTOM_SCOPES as _WARM_SCOPES  # noqa: E402
from gpuportal.spawners.warm import READ_SCOPE as _WARM_READ  # noqa: E402

c.JupyterHub.custom_scopes = dict(_WARM_SCOPES)
c.JupyterHub.load_roles = [
    # Every user may reach the portal API as themselves, and the dashboards.
    {"name": "user", "scopes": ["self", _portal_access, dashboards.ACCESS]},
    {"name": "customers", "groups": ["customers"], "scopes": ["self", _portal_access]},
    {"name": "providers", "groups": ["providers"], "scopes": ["self", _portal_access]},
    {
        "name": "admins",
        "groups": ["admins"],
        "scopes": [
            "admin-ui",
            "admin:users",
            "admin:servers",
            "admin:groups",
            "list:services",
            "read:services",
            "access:services",
            "tokens",
            _WARM_READ,
        ],
    },
    # The portal service reads users and groups to keep accounts and teams in
    # step, may stop servers (metering's out-of-credit stop), manages the groups
    # that are teams, and makes the server shares it allowed; it can change
    # nothing else in the hub.
    {
        "name": "portal-service",
        "services": ["portal"],
        "scopes": [
            "list:users",
            "read:users",
            "list:groups",
            "read:groups",
            # The meter stops a server whose payer ran out of credit after the grace
            # period (DELETE /hub/api/users/{name}/servers/{server}).
            "servers",
            # Teams are hub groups: the portal's team API creates them (admins) and
            # adds and removes members (team admins), see docs/teams.md.
            "admin:groups",
            "groups",
            # Sharing a running server with a teammate: users hold no `shares` scope,
            # so they share through the portal, which checks that both are teammates
            # and revokes the share when the member leaves the team.
            "shares",
            # The portal's health reads each node's warm slots (GET
            # /hub/api/gpuportal/warm): counts and states only, no user or token.
            _WARM_READ,
        ],
    },
]

# --- The portal service (FastAPI) --------------------------------------------
# Only the control plane sees these settings; nothing here reaches a user server.
# Every portal setting as resolved here (data dir made absolute, DB URL
# validated), except the admin's password, which the portal never needs.
_portal_env = {
    f"GPUPORTAL_{name.upper()}": str(getattr(gp, name))
    for name, field in type(gp).model_fields.items()
    if field.validation_alias is None and name != "admin_password"
}
_portal_env.update(
    GPUPORTAL_DB_URL=gp.database_url.render_as_string(hide_password=False),
    GPUPORTAL_RAY_DASHBOARD_URL=gp.ray_jobs_url,
    RAY_USAGE_STATS_ENABLED="0",
)


# The RaySpawner reserves GPUs for users as the hub service "ray-spawner", which
# the portal trusts (GPUPORTAL_TRUSTED_SERVICES). Its token is generated once
# and kept 0600 in the data dir, like the cookie secret; it never leaves the hub.
def _service_token(path: Path) -> str:
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32))
    return path.read_text().strip()


_spawner_token = _service_token(data / "ray-spawner-token")
c.JupyterHub.services = [
    {
        "name": "portal",
        "display": True,
        "url": f"http://127.0.0.1:{gp.portal_port}",  # GPUPORTAL_PORTAL_PORT, default 8002
        "command": [sys.executable, "-m", "gpuportal.hub.portal.service"],
        "environment": _portal_env,
        "oauth_no_confirm": True,
    },
    # No URL: an identity with a token, and no hub scopes at all.
    {"name": "ray-spawner", "api_token": _spawner_token},
    # Voila dashboards behind hub OAuth (docs/dashboards.md): GPUPORTAL_DASHBOARDS_PORT.
    dashboards.service(gp),
]

# --- User servers --------------------------------------------------------------
# RaySpawner: each server is a Ray job on a GPU node reserved through the portal's
# marketplace (docs/spawner.md). The house cluster (the local Ray head) also runs
# CPU-only servers. The wrapper on the node (gpuportal-singleuser) binds 127.0.0.1,
# which the hub reaches because the house node is this machine.
from gpuportal.hub.stack.localray import plan_gpus  # noqa: E402
from gpuportal.spawners.profiles import default_profile_list  # noqa: E402

c.JupyterHub.spawner_class = "ray"
c.RaySpawner.portal_url = f"http://127.0.0.1:{gp.portal_port}{gp.service_prefix}"
c.RaySpawner.portal_token = _spawner_token
c.RaySpawner.cpu_jobs_url = gp.ray_jobs_url
# Every Ray cluster runs with token authentication; the house cluster's token is
# in the data dir (GPUPORTAL_RAY_TOKEN_FILE). GPU clusters' tokens come with each
# reservation. Only the spawner, the portal and the node agent hold them.
if gp.ray_token_path.exists():
    c.RaySpawner.cpu_ray_token = gp.ray_token_path.read_text().strip()
# The node runs this same environment: name its wrapper by path, since a Ray
# job's PATH is the Ray head's, not this virtualenv's.
_wrapper = Path(sys.executable).parent / "gpuportal-singleuser"
if _wrapper.exists():
    c.RaySpawner.entrypoint = [str(_wrapper)]
# The GPU profile offers the common models plus the house node's own.
c.RaySpawner.profile_list = default_profile_list(models=plan_gpus(gp).models)
# Each server runs as its customer's own OS account, in that account's home
# (GPUPORTAL_HOMES_DIR on the house node), never inside the data dir.
# A spawn is a reservation, a Ray job (a new Ray worker for its supervisor) and a
# Jupyter server; a burst of them on a small machine takes more than the default 60 s.
c.Spawner.start_timeout = 120
c.Spawner.default_url = "/lab"
c.Spawner.ip = "127.0.0.1"
# Servers are Ray jobs, not children of the hub: a hub restart keeps them
# (spawner state holds cluster, job and reservation ids).
c.JupyterHub.cleanup_servers = False
# Warm pools (docs/spawner.md): each GPU node keeps servers that have paid for
# their imports, claimed at spawn in well under a second. The first spawn on a
# node starts cold and starts its pool. GPUPORTAL_WARM_POOLS=0 turns them off;
# GPUPORTAL_WARM_SLOTS sets how many wait per node (default: one per free GPU, at most
# GPUPORTAL_WARM_SLOTS_MAX, 4). With none waiting, a node's pool starts each server
# as its spawn comes (GPUPORTAL_WARM_SLOTS_MAX=0 keeps none waiting).
c.RaySpawner.warm_pools = os.environ.get("GPUPORTAL_WARM_POOLS", "1") != "0"
c.RaySpawner.warm_secret = _service_token(data / "warm-pool-secret")
if os.environ.get("GPUPORTAL_WARM_SLOTS", "").isdigit():
    c.RaySpawner.warm_slots = int(os.environ["GPUPORTAL_WARM_SLOTS"])
if os.environ.get("GPUPORTAL_WARM_SLOTS_MAX", "").isdigit():
    c.RaySpawner.warm_slots_max = int(os.environ["GPUPORTAL_WARM_SLOTS_MAX"])
# How long a user server trusts the hub's answer about a token or login: a revoked
# share, or a member who left a team, loses access to the server within this time.
if os.environ.get("GPUPORTAL_TOKEN_CHECK_SECONDS", "").isdigit():
    c.RaySpawner.token_check_seconds = int(os.environ["GPUPORTAL_TOKEN_CHECK_SECONDS"])
# What the server extension (gpuportal.extensions, docs/extension.md) needs and
# JupyterHub does not give: where the portal is, through the public proxy. No
# secret: the extension calls it with the server's own hub token, read-only.
# (GPUPORTAL_IDLE_TIMEOUT_SECONDS, the GPU-aware idle limit, is set per profile
# by the spawner; unset, the extension stops a server idle for 30 minutes.)
c.Spawner.environment = {"GPUPORTAL_PORTAL_URL": f"http://127.0.0.1:{gp.port}/services/portal/"}
# GPU time costs money: logging in lands on the hub home page, and a server
# starts only when the user asks for one.
c.JupyterHub.redirect_to_server = False

# --- More configuration --------------------------------------------------------
# GPUPORTAL_HUB_EXTRA_CONFIG: a Python config file loaded last (authenticator
# secrets, site specifics) so this file stays as it ships.
_extra = os.environ.get("GPUPORTAL_HUB_EXTRA_CONFIG")
if _extra:
    load_subconfig(_extra)
