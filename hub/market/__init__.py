"""The marketplace: who gets which GPU.

Placement rules, the capacity index, reservations, providers, nodes and Ray's view
of them. This layer knows nothing of money; it imports only the kernel and ``db``.
"""
