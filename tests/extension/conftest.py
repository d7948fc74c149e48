"""pytest-jupyter's server fixtures for the extension's tests only.

The fixtures are imported here rather than enabled for the whole suite, so
pytest-jupyter's event-loop hooks touch only these tests.
"""

from __future__ import annotations

from typing import Any

import pytest
from pytest_jupyter.jupyter_core import *  # noqa: F403
from pytest_jupyter.jupyter_server import *  # noqa: F403

from ..portal_stack import free_port


@pytest.fixture
def gpuportal_config() -> dict[str, Any]:
    """The extension's traits for one test; tests override this fixture or mutate it.

    By default the portal URL points at a closed port on 127.0.0.1 and the
    periodic idle check is off, so tests call it themselves.
    """
    return {
        "portal_url": f"http://127.0.0.1:{free_port()}/services/portal/",
        "api_token": "not-a-real-token",
        "hub_user": "meg",
        "server_name": "",
        "portal_timeout_seconds": 2.0,
        "portal_cache_seconds": 0.0,
        "idle_timeout_seconds": 0,
        "visible_gpus": [],
    }


@pytest.fixture
def jp_server_config(gpuportal_config: dict[str, Any]) -> dict[str, Any]:
    return {
        "ServerApp": {"jpserver_extensions": {"gpuportal.extensions": True}},
        "GpuPortalExtension": gpuportal_config,
    }
