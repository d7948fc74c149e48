"""The hub's proxy when Node's configurable-http-proxy is not installed: the PyPI port,
answering websocket subprotocols.

The PyPI port forwards a browser's ``Sec-WebSocket-Protocol`` offer to the server
behind it but never answers it, and a browser that offered a subprotocol drops a
connection whose answer names none ("Sent non-empty 'Sec-WebSocket-Protocol' header
but no response was received"). Jupyter kernels' websockets offer
``v1.kernel.websocket.jupyter.org`` (JupyterLab, Voila dashboards), so without this
no kernel would connect through the proxy. Here the proxy answers with whatever the
server behind it chose, as Node's proxy does. It also forwards a browser's binary
frames as binary (the port sends them on as text, which breaks the kernel protocol
``v1`` that those websockets speak). And a proxied response may take up to
:data:`RESPONSE_SECONDS`, not Tornado's default 20 s for the whole response: a Voila
dashboard streams its page while its kernel computes, which on a small, busy machine
takes longer. ``jupyterhub_config.py`` runs it as
``python -m gpuportal.hub.stack.proxy`` with the usual command line.
"""

from __future__ import annotations

import sys
from typing import Any

from configurable_http_proxy import cli
from configurable_http_proxy.handlers import ProxyHandler

#: The longest a proxied response may take, start to end (``--proxy-timeout``).
RESPONSE_SECONDS = 300


def select_subprotocol(handler: Any, subprotocols: list[str]) -> str | None:
    """The subprotocol the upstream server selected, if the browser offered it."""
    upstream = getattr(handler, "ws_client", None)
    chosen = getattr(upstream, "selected_subprotocol", None)
    return chosen if chosen in subprotocols else None


def on_message(handler: Any, message: str | bytes) -> None:
    """A browser's frame to the server behind the proxy, binary frames as binary."""
    if handler.ws_client:
        prefix = handler.target["prefix"] if handler.target else ""
        if prefix:
            handler.proxy.update_last_activity(prefix)
        handler.ws_client.write_message(message, binary=isinstance(message, bytes))


def main() -> None:
    ProxyHandler.select_subprotocol = select_subprotocol
    ProxyHandler.on_message = on_message
    if not any(arg.startswith("--proxy-timeout") for arg in sys.argv[1:]):
        sys.argv.append(f"--proxy-timeout={RESPONSE_SECONDS * 1000}")
    cli.main()


if __name__ == "__main__":
    main()
