"""gpuportal's control plane: portal DB, portal API service, CLI and the embedded stack.

This package runs only on the trusted side (the hub machine). Node-side code
(`gpuportal.provider`, `gpuportal.extensions`) never imports it.
"""

__version__ = "0.1.0"
