"""The portal's HTTP routes, one module per area: status, market, providers, billing.

HTTP only: parse, authorise, then call a domain function of ``market`` or ``billing``.
"""
