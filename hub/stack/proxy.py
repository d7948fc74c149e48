"""The hub's proxy when Node's configurable-http-proxy is not installed: the PyPI port,
mended where it differs from Node's.

- **Websockets.** The PyPI port forwards a browser's ``Sec-WebSocket-Protocol`` offer
  to the server behind it but never answers it, and a browser that offered a
  subprotocol drops a connection whose answer names none ("Sent non-empty
  'Sec-WebSocket-Protocol' header but no response was received"). Jupyter kernels'
  websockets offer ``v1.kernel.websocket.jupyter.org`` (JupyterLab, Voila dashboards),
  so without this no kernel would connect through the proxy. Here the proxy answers
  with whatever the server behind it chose, as Node's proxy does. It also forwards a
  browser's binary frames as binary (the port sends them on as text, which breaks the
  kernel protocol ``v1`` that those websockets speak).
- **Streaming.** The port reads each upstream response whole before it answers, so a
  ``text/event-stream`` (the spawn progress page's events) reaches the browser in one
  piece at the end. Here each response is relayed chunk by chunk and flushed at once,
  as Node's proxy relays it.
- **Long responses.** A proxied response may take up to :data:`RESPONSE_SECONDS`, not
  Tornado's default 20 s for the whole response: a Voila dashboard streams its page
  while its kernel computes, which on a small, busy machine takes longer.

Everything else (routing, the REST API that JupyterHub drives, error pages) is the
port's own code. ``jupyterhub_config.py`` runs it as
``python -m gpuportal.hub.stack.proxy`` with the usual command line.
"""

from __future__ import annotations

import sys
from typing import Any

from configurable_http_proxy import cli, configproxy
from configurable_http_proxy.handlers import ProxyHandler
from tornado import httputil
from tornado.httpclient import AsyncHTTPClient

#: The longest a proxied response may take, start to end (``--proxy-timeout``).
RESPONSE_SECONDS = 300

#: Hop-by-hop and body-framing headers that this proxy sets itself, as the port does.
SKIP_HEADERS = frozenset({"content-length", "transfer-encoding", "content-encoding", "connection"})
#: How long a streamed response may last (seconds): a spawn's progress stream lasts
#: as long as the spawn, far beyond a plain request's timeout.
STREAM_TIMEOUT = 3600.0


class ClientGone(Exception):
    """The browser closed the connection: stop reading from upstream."""


def _quietly(future: Any) -> None:
    """A flush to a browser that left fails; that is no error worth a log line."""
    future.exception()


class StreamingProxyHandler(ProxyHandler):
    """The PyPI port's proxy handler, relaying each response as its chunks arrive."""

    async def call_proxy(self, path: Any = None) -> None:
        url = await self.get_target_url(path)
        if url is None:
            return
        request = self._get_proxy_request(url)
        if "text/event-stream" in self.request.headers.get("Accept", ""):
            request.request_timeout = STREAM_TIMEOUT
        started = False
        # As the port does: upstream's value replaces a header the proxy's own server
        # set (Server, Content-Type, Date); any other is added (several Set-Cookie).
        own = {name.lower() for name, _ in self._headers.get_all()}

        def on_header(line: str) -> None:
            nonlocal started
            line = line.rstrip("\r\n")
            if line.startswith("HTTP/"):
                start = httputil.parse_response_start_line(line)
                self.set_status(start.code, start.reason)
                return
            if not line:
                started = True
                return
            name, _, value = line.partition(":")
            name, value = name.strip(), value.strip()
            if name.lower() in SKIP_HEADERS:
                return
            if name.lower() in own:
                self.set_header(name, value)
                own.discard(name.lower())
            else:
                self.add_header(name, value)

        def on_chunk(chunk: bytes) -> None:
            stream = getattr(self.request.connection, "stream", None)
            if stream is not None and stream.closed():
                raise ClientGone()  # ends the upstream request too
            self.write(chunk)
            self.flush().add_done_callback(_quietly)

        request.header_callback = on_header
        request.streaming_callback = on_chunk
        try:
            await AsyncHTTPClient().fetch(request, raise_error=False)
        except Exception as err:
            if isinstance(err, ClientGone) or started:
                # Nobody to answer, or the status is sent: all that is left is to end.
                self._end()
                return
            await self.handle_proxy_error(503, err)
            return
        self._end()

    def _end(self) -> None:
        if self._finished:
            return
        try:
            self.finish()
        except Exception:  # the browser left; nothing to tell it
            self.proxy.log.debug("client gone before %s finished", self.request.path)


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
    configproxy.ProxyHandler = StreamingProxyHandler  # the app is built from this name
    if not any(arg.startswith("--proxy-timeout") for arg in sys.argv[1:]):
        sys.argv.append(f"--proxy-timeout={RESPONSE_SECONDS * 1000}")
    cli.main()


if __name__ == "__main__":
    main()
