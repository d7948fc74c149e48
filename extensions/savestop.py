"""Save before stop: the front end saves every open document before the server stops.

Two things stop a user server while someone may have unsaved work open: the
portal's credit stop (the allocation is ``stopping`` with a ``stopping_at``)
and this extension's own idle cull. Before either, the extension raises a
**save request**, which ``GET /api/gpuportal/usage`` carries as ``save``; the
JupyterLab front end, polling that endpoint every few seconds, saves every
open document and answers ``POST /api/gpuportal/save-ack`` with the request's
id. The stop then goes ahead as soon as it is due and acknowledged, or once
``wait_seconds`` have passed since the request, whichever is first: a closed
browser tab never keeps a server (and its bill) alive longer than that bound.

The protocol is one request at a time and idempotent: a second request while
one is pending returns the pending one, and acknowledging a request twice, or
an old one, changes nothing.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

#: Reasons the front end knows how to explain (anything else is shown as "stopped").
REASONS = ("out_of_credit", "quota_exhausted", "idle")


@dataclass
class SaveRequest:
    """One request to save before a stop at ``stop_at`` for ``reason``."""

    id: str
    reason: str
    requested_at: datetime
    stop_at: datetime
    deadline: datetime
    acknowledged_at: datetime | None = None
    saved: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


class SaveBeforeStop:
    """The pending save request, its acknowledgement, and the bounded wait for it."""

    def __init__(self, *, wait_seconds: float) -> None:
        self.wait_seconds = wait_seconds
        self.current: SaveRequest | None = None
        self._acked = asyncio.Event()

    def request(self, reason: str, now: datetime, stop_at: datetime | None = None) -> SaveRequest:
        """Ask the front end to save before a stop at ``stop_at`` (now by default).

        A request already pending is kept (same id) and its stop moves to the
        earlier of the two times, so a credit stop during an idle countdown wins.
        """
        when = stop_at or now
        pending = self.current
        if pending is not None:
            if when < pending.stop_at:
                pending.stop_at, pending.reason = when, reason
            return pending
        self._acked = asyncio.Event()
        self.current = SaveRequest(
            id=secrets.token_hex(8),
            reason=reason,
            requested_at=now,
            stop_at=when,
            deadline=now + timedelta(seconds=self.wait_seconds),
        )
        return self.current

    def cancel(self) -> None:
        """The stop was called off (credit topped up): forget the request."""
        self.current = None
        self._acked.set()

    def acknowledge(
        self, request_id: str, now: datetime, saved: list[str], failed: list[str]
    ) -> bool:
        """The front end saved (``saved``) or could not save (``failed``); True when this
        acknowledged the pending request."""
        pending = self.current
        if pending is None or pending.id != request_id or pending.acknowledged_at is not None:
            return False
        pending.acknowledged_at, pending.saved, pending.failed = now, saved, failed
        self._acked.set()
        return True

    def stop_time(self) -> datetime | None:
        """When the stop may go ahead: at ``stop_at`` once acknowledged, else at the later
        of ``stop_at`` and the request's deadline."""
        pending = self.current
        if pending is None:
            return None
        if pending.acknowledged_at is not None:
            return pending.stop_at
        return max(pending.stop_at, pending.deadline)

    async def wait_for_ack(self, seconds: float) -> bool:
        """Wait at most ``seconds`` for the acknowledgement; True when it came."""
        if seconds <= 0:
            return self._acked.is_set()
        try:
            await asyncio.wait_for(self._acked.wait(), timeout=seconds)
        except TimeoutError:
            return False
        return True

    def report(self) -> dict[str, Any] | None:
        """The ``save`` part of the usage report; None when nothing is pending."""
        pending = self.current
        if pending is None:
            return None
        return {
            "id": pending.id,
            "reason": pending.reason,
            "requested_at": pending.requested_at.isoformat(),
            "stop_at": pending.stop_at.isoformat(),
            "deadline": pending.deadline.isoformat(),
            "acknowledged": pending.acknowledged_at is not None,
            "saved": list(pending.saved),
            "failed": list(pending.failed),
        }
