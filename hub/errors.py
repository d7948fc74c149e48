"""User-facing errors: one exception type for the CLI, one JSON shape for the API.

A person never sees a traceback. The CLI prints one line and exits with 2; the
API answers ``{"error": {"code": ..., "message": ...}}`` with the request id.
"""

from __future__ import annotations


class ConfigError(Exception):
    """A problem the operator can fix: bad setting, unreachable service, busy port.

    The message is one sentence that names the variable or the problem.
    """

    exit_code = 2
