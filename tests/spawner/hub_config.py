# JupyterHub config for the spawner tests: RaySpawner against the test's own Ray
# nodes and marketplace, everything on 127.0.0.1, values from TEST_* variables.
# ruff: noqa: F821
import os
import sys
from pathlib import Path

from gpuportal.spawners.profiles import default_profile_list
from gpuportal.spawners.warm import CUSTOM_SCOPES, READ_SCOPE

env = os.environ
data = Path(env["TEST_HUB_DATA"])
venv_bin = Path(sys.executable).parent

c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = int(env["TEST_HUB_PORT"])
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = int(env["TEST_HUB_API_PORT"])
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{env['TEST_PROXY_API_PORT']}"
c.ConfigurableHTTPProxy.command = [str(venv_bin / "configurable-http-proxy")]
c.ConfigurableHTTPProxy.auth_token = env["TEST_PROXY_TOKEN"]
c.JupyterHub.db_url = f"sqlite:///{data / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(data / "cookie_secret")
c.JupyterHub.cleanup_servers = False
c.JupyterHub.allow_named_servers = True
c.JupyterHub.concurrent_spawn_limit = int(env.get("TEST_SPAWN_LIMIT", "0"))
c.JupyterHub.active_server_limit = int(env.get("TEST_ACTIVE_LIMIT", "0"))
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allow_all = True
c.JupyterHub.services = [
    {"name": "tester", "api_token": env["TEST_ADMIN_TOKEN"]},
    {"name": "ray-spawner", "api_token": env["TEST_SPAWNER_TOKEN"]},
    # The portal's own identity, for its health's view of the warm pools (test_warm.py).
    {"name": "portal", "api_token": env["TEST_PORTAL_SERVICE_TOKEN"]},
]
c.JupyterHub.custom_scopes = dict(CUSTOM_SCOPES)
c.JupyterHub.load_roles = [
    {
        "name": "tester",
        "services": ["tester"],
        "scopes": [
            "admin:users",
            "admin:servers",
            "access:servers",
            "list:users",
            "read:users",
            "proxy",
        ],
    },
    # As jupyterhub_config.py grants it: the portal reads the warm pools, no more.
    {"name": "portal-service", "services": ["portal"], "scopes": [READ_SCOPE]},
]

c.JupyterHub.spawner_class = "ray"
c.Spawner.ip = "127.0.0.1"
c.Spawner.notebook_dir = str(data / "users" / "{username}")
c.Spawner.http_timeout = 60
c.Spawner.start_timeout = 90
# Only JUPYTERHUB_* may reach the node: these must not.
c.Spawner.environment = {"LEAKY_SECRET": "do-not-ship"}
c.RaySpawner.portal_url = env["TEST_PORTAL_URL"]
c.RaySpawner.portal_token = env["TEST_SPAWNER_TOKEN"]
c.RaySpawner.cpu_jobs_url = env["TEST_JOBS_URL"]
c.RaySpawner.cpu_ray_token = env["TEST_RAY_TOKEN"]
c.RaySpawner.entrypoint = [str(venv_bin / "gpuportal-singleuser")]
c.RaySpawner.dead_after = float(env.get("TEST_DEAD_AFTER", "30"))
c.RaySpawner.stop_timeout = 15
c.RaySpawner.profile_list = [
    *default_profile_list(),
    # Fault injection: a server that exits at once, and one that never reports.
    {
        "display_name": "Broken",
        "slug": "broken",
        "spawner_override": {"gpu_count": 1, "entrypoint": ["false"]},
    },
    {
        "display_name": "Never ready",
        "slug": "never",
        "spawner_override": {
            "gpu_count": 1,
            "entrypoint": ["sh", "-c", "sleep 600", "--"],
            "start_timeout": 6,
        },
    },
]
# Warm pools, for the tests that ask for them (test_warm.py).
if env.get("TEST_WARM_SECRET"):
    c.RaySpawner.warm_pools = True
    c.RaySpawner.warm_secret = env["TEST_WARM_SECRET"]
    c.RaySpawner.warm_slots = int(env.get("TEST_WARM_SLOTS", "1"))
