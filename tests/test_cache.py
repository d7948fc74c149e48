"""The cache contract, on the in-process backend and on a real Redis."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import pytest

from gpuportal.hub.errors import ConfigError
from gpuportal.hub.portal.cache import Cache, MemoryCache, RedisCache, check_redis, make_cache


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def cache(request: pytest.FixtureRequest) -> AsyncIterator[Cache]:
    if request.param == "memory":
        backend: Cache = MemoryCache()
    else:
        # Each test gets its own key prefix, so runs in parallel never collide.
        backend = RedisCache(
            request.getfixturevalue("redis_url"), prefix=f"gpuportal-test-{secrets.token_hex(4)}:"
        )
    yield backend
    await backend.close()


async def test_set_get_delete(cache: Cache) -> None:
    assert await cache.get("k") is None
    await cache.set("k", "v")
    assert await cache.get("k") == "v"
    await cache.delete("k")
    assert await cache.get("k") is None


async def test_expiry(cache: Cache) -> None:
    await cache.set("short", "v", ttl=0.2)
    await cache.set("long", "v", ttl=60)
    assert await cache.get("short") == "v"
    await asyncio.sleep(0.4)
    assert await cache.get("short") is None
    assert await cache.get("long") == "v"
    await cache.delete("long")


async def test_ping(cache: Cache) -> None:
    assert await cache.ping() is True


def test_backend_choice() -> None:
    assert make_cache("").backend == "memory"
    assert make_cache("redis://127.0.0.1:6379/0").backend == "redis"
    with pytest.raises(ConfigError, match="GPUPORTAL_REDIS_URL"):
        make_cache("http://127.0.0.1:6379")


def test_unreachable_redis_is_one_clear_error() -> None:
    with pytest.raises(ConfigError, match="cannot reach Redis at GPUPORTAL_REDIS_URL"):
        check_redis("redis://127.0.0.1:1/0")


async def test_memory_cache_stays_bounded() -> None:
    cache = MemoryCache(max_entries=3)
    for i in range(10):
        await cache.set(f"k{i}", "v", ttl=60)
    assert len(cache._data) <= 3
    assert await cache.get("k9") == "v"
