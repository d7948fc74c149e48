"""Entry point of the portal service process: ``python -m gpuportal.hub.portal.service``.

JupyterHub starts it as a managed service and passes ``JUPYTERHUB_SERVICE_URL``;
it binds exactly that host and port (127.0.0.1 in the embedded stack).
"""

from __future__ import annotations

import sys
from urllib.parse import urlparse

import uvicorn

from ..errors import ConfigError
from ..settings import load_settings
from .app import create_app
from .reqlog import configure_logging


def main() -> int:
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"gpuportal portal: {exc}", file=sys.stderr)
        return exc.exit_code
    configure_logging(settings.log_level)
    url = urlparse(settings.service_url)
    uvicorn.run(
        create_app(settings),
        host=url.hostname or "127.0.0.1",
        port=url.port or settings.portal_port,
        log_config=None,
        access_log=True,
        proxy_headers=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
