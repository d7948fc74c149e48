"""Node-side code: runs on provider machines, next to customer code.

Nothing here imports ``gpuportal.hub``; it talks to the portal over HTTP only.
"""
