"""configurable-http-proxy (the PyPI port) that streams responses as they come.

The PyPI port reads each upstream response whole before it answers, so a
``text/event-stream`` (the spawn progress page's events) reaches the browser in
one piece at the end. This runs the same proxy (same command line, same REST
API, which JupyterHub drives) with one handler changed: the upstream response
is relayed chunk by chunk and flushed at once, the way Node's
configurable-http-proxy relays it. Everything else (routing, websockets, error
pages) is the PyPI port's own code.

Run as ``python -m gpuportal.hub.stack.streamproxy [configurable-http-proxy options]``.
"""

from __future__ import annotations

from typing import Any

from configurable_http_proxy import configproxy
from configurable_http_proxy.handlers import ProxyHandler
from tornado import httputil
from tornado.httpclient import AsyncHTTPClient

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


def main() -> None:
    configproxy.ProxyHandler = StreamingProxyHandler  # the app is built from this name
    from configurable_http_proxy.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
