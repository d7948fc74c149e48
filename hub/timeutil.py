"""Timezone-aware UTC time, in one place so tests can travel in time.

Every timestamp in gpuportal is an aware ``datetime`` in UTC. Code that needs
"now" calls :func:`utcnow`; tests patch it instead of sleeping.
"""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    """The current moment as an aware UTC datetime (patchable in tests)."""
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """Return ``value`` as aware UTC; a naive value is taken to be UTC already."""
    if value.tzinfo is UTC:
        # What PostgreSQL (session zone UTC) and the portal itself hand over: as it is.
        # (astimezone would build the same value again: ~2 us, 60,000 times a meter tick.)
        return value
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)
