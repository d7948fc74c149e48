"""The portal service: the FastAPI process.

The ``Portal`` context, the app factory, the service entry point, authentication,
the hub API client, the cache, request logging and the background loops. Route
modules live in ``portal.api``.
"""
