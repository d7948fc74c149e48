"""gpuportal's control plane, in layers; each imports only those below it.

kernel (the modules here: settings, errors, timeutil, egress) ← ``db`` (engine,
sessions, every table, migrations) ← ``market`` (who gets which GPU) ← ``billing``
(money) ← ``portal`` (the FastAPI service; routes in ``portal.api``) ← ``stack`` (the
CLI, ``gpuportal up``/``down``, local Ray, the house provider). ``tests/test_layers.py``
enforces the order.

This package runs only on the trusted side (the hub machine). Node-side code
(`gpuportal.provider`, `gpuportal.extensions`) never imports it.
"""

__version__ = "0.1.0"
