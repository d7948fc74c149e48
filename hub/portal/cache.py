"""Hot-state cache: Redis when ``GPUPORTAL_REDIS_URL`` is set, in-process otherwise.

Both backends have the same small async interface, so callers never branch on
which one is in use. SQL stays the truth; the cache only saves round trips
(verified tokens, node availability, heartbeats, balances).
"""

from __future__ import annotations

import time
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ..errors import ConfigError


class Cache(Protocol):
    backend: str

    async def get(self, key: str) -> str | None: ...
    async def set(self, key: str, value: str, ttl: float | None = None) -> None: ...
    async def delete(self, key: str) -> None: ...
    async def ping(self) -> bool: ...
    async def close(self) -> None: ...


class MemoryCache:
    """A per-process dict with expiry; enough for one portal process."""

    backend = "memory"

    def __init__(self, max_entries: int = 100_000) -> None:
        self._data: dict[str, tuple[str, float | None]] = {}
        self._max_entries = max_entries

    async def get(self, key: str) -> str | None:
        item = self._data.get(key)
        if item is None:
            return None
        value, expires = item
        if expires is not None and expires <= time.monotonic():
            self._data.pop(key, None)
            return None
        return value

    async def set(self, key: str, value: str, ttl: float | None = None) -> None:
        if len(self._data) >= self._max_entries:
            self._purge()
        expires = time.monotonic() + ttl if ttl else None
        self._data[key] = (value, expires)

    async def delete(self, key: str) -> None:
        self._data.pop(key, None)

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._data.clear()

    def _purge(self) -> None:
        now = time.monotonic()
        for key in [k for k, (_, exp) in self._data.items() if exp is not None and exp <= now]:
            del self._data[key]
        while len(self._data) >= self._max_entries:  # still full: drop the oldest
            del self._data[next(iter(self._data))]


class RedisCache:
    """redis-py's asyncio client behind the same interface."""

    backend = "redis"

    def __init__(self, url: str, prefix: str = "gpuportal:") -> None:
        self._client = aioredis.from_url(url, decode_responses=True, socket_timeout=5)
        self._prefix = prefix

    async def get(self, key: str) -> str | None:
        value = await self._client.get(self._prefix + key)
        return None if value is None else str(value)

    async def set(self, key: str, value: str, ttl: float | None = None) -> None:
        px = int(ttl * 1000) if ttl else None
        await self._client.set(self._prefix + key, value, px=px)

    async def delete(self, key: str) -> None:
        await self._client.delete(self._prefix + key)

    async def ping(self) -> bool:
        try:
            return bool(await self._client.ping())
        except (RedisError, OSError):
            return False

    async def close(self) -> None:
        await self._client.aclose()


def make_cache(redis_url: str) -> Cache:
    """The cache for ``GPUPORTAL_REDIS_URL``; an in-process one when it is empty."""
    if not redis_url:
        return MemoryCache()
    if not redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(
            "GPUPORTAL_REDIS_URL must start with redis://, rediss:// or unix:// "
            f"(got {redis_url!r})."
        )
    return RedisCache(redis_url)


def check_redis(redis_url: str) -> None:
    """Raise :class:`ConfigError` when Redis at ``redis_url`` does not answer a PING."""
    import redis

    try:
        client = redis.Redis.from_url(redis_url, socket_timeout=3, socket_connect_timeout=3)
        client.ping()
        client.close()
    except (RedisError, OSError, ValueError) as exc:
        raise ConfigError(f"cannot reach Redis at GPUPORTAL_REDIS_URL={redis_url}: {exc}") from None
