"""The portal's hub client puts a user name into a URL as one quoted path segment."""

from __future__ import annotations

import asyncio

import httpx

from gpuportal.hub.portal.hubapi import HubAPI


def test_a_crafted_user_name_stays_one_path_segment() -> None:
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.raw_path.decode())
        return httpx.Response(404)

    async def run() -> None:
        hub = HubAPI("http://127.0.0.1:1/hub/api", "service-token")
        hub._client = httpx.AsyncClient(transport=httpx.MockTransport(answer))
        try:
            assert await hub.user("../groups/admins?x=1#y") is None
        finally:
            await hub.close()

    asyncio.run(run())
    assert seen == ["/hub/api/users/..%2Fgroups%2Fadmins%3Fx%3D1%23y"]
