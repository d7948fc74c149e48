"""Money: the ledger, metering, allocations, quotas, credits, usage, deposits and
the reservation ↔ bill join.

It may read the marketplace's tables and functions; the marketplace never imports
it. It imports only the kernel, ``db`` and ``market``.
"""
