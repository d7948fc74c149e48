"""The hub's own pages: money on every page, the billing page, sign-up.

JupyterHub renders its pages from Jinja templates (autoescaped); this package
ships ours as package data and adds them to ``JupyterHub.template_paths``
ahead of the stock ones, extending them (``{% extends "templates/page.html" %}``)
rather than copying them:

* every page: the balance and runway in the navigation bar and a banner for a
  low runway, an exhausted credit or a scheduled stop (``page.html``);
* the home page: per running server its GPUs, price and spend so far, why a
  server was stopped, and what a stopped session cost (``home.html``);
* the billing page, ``/hub/billing`` (``billing.html``): balance and available
  credit (debt shown as debt), usage per server and per day with the CSV
  export, grants and deposits, and how to add credit (address, QR code);
* the login and sign-up pages (``login.html``, ``signup.html``, ``signup.py``).

Every number comes from the portal's API, asked **as the logged-in user** with a
short-lived, read-only hub token of that user (``portal_reader.py``), so the
portal's own rules decide what a page may show: a user sees only their own
balance and usage.

This is the control plane's top layer, beside ``stack``: it is configured by
``jupyterhub_config.py`` through :func:`configure`.
"""

from __future__ import annotations

from .setup import configure

__all__ = ["configure"]
