"""The dashboards service's Voila configuration, as a kernel manager reads it."""

from __future__ import annotations

from pathlib import Path

from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager
from traitlets.config import Config

from gpuportal.dashboards import service


def test_a_dropped_kernel_socket_is_not_buffered_for_replay(tmp_path: Path) -> None:
    """Voila's kernel manager is a class it derives from the server's at start-up; any
    such subclass takes the setting: a page's kernel websocket that drops gets fresh
    channels when it comes back, never the old ones with a replayed buffer."""

    class VoilaLike(AsyncMappingKernelManager):
        """Stands for the subclass ``voila_kernel_manager_factory`` builds."""

    config = Config(service.voila_config({}))
    assert VoilaLike(config=config, root_dir=str(tmp_path)).buffer_offline_messages is False
    assert AsyncMappingKernelManager(root_dir=str(tmp_path)).buffer_offline_messages is True
