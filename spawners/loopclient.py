"""A long-lived ``httpx.AsyncClient`` per event loop, for the spawner's remote calls.

KubeSpawner keeps one API client for the life of the hub; so does the spawner:
one connection pool per remote API, not a new client (and TCP connection) per
poll. An ``httpx.AsyncClient`` belongs to the event loop it was first used in,
so a new loop (a test's ``asyncio.run``) gets a new client; the hub has one loop.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx


class LoopClient:
    """One long-lived ``httpx.AsyncClient`` (keep-alive, one connection pool), made on
    first use in the running event loop.

    A client belongs to the loop it was made in; a hub has one loop for its life, so
    in the hub this is one client. A new loop (a test's ``asyncio.run``) gets a new one.
    """

    def __init__(self, **client_kwargs: Any) -> None:
        self._kwargs = client_kwargs
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: How many clients were made: a test checks that polling reuses one.
        self.made = 0

    def client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._client.is_closed or self._loop is not loop:
            self._client = httpx.AsyncClient(**self._kwargs)
            self._loop = loop
            self.made += 1
        return self._client

    async def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return await self.client().get(url, **kwargs)

    async def aclose(self) -> None:
        if self._client is not None and self._loop is asyncio.get_running_loop():
            await self._client.aclose()
        self._client = None
