"""Spawn errors a user reads: one sentence, no class name, and a link where one helps.

JupyterHub shows ``str()`` of a ``SpawnException`` ("422 SpawnException(reason=
invalid): ...") unless the exception carries ``jupyterhub_message``; the
``jupyterhub_html_message`` is what the spawn-pending page and the
server-not-running page show. ``SpawnRefusal`` sets both: the sentence as text,
and the same sentence (escaped by ``markupsafe``) with an optional link.
"""

from __future__ import annotations

from jupyterhub.spawner import SpawnException
from markupsafe import Markup

#: Portal error codes that mean "not enough credit or budget": the refusal links to
#: where credit is added.
CREDIT_CODES = frozenset({"payment_required", "quota_exceeded"})


class SpawnRefusal(SpawnException):
    """A ``SpawnException`` whose user-facing text is the sentence alone.

    ``link``: ``(url, text)`` shown after the sentence where HTML is shown.
    ``credit``: the refusal is for lack of credit (the form then links to add credit).
    """

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        status_code: int = 400,
        log_message: str = "",
        link: tuple[str, str] | None = None,
        credit: bool = False,
    ) -> None:
        html = Markup.escape(message)
        if link is not None:
            html = Markup('{} <a href="{}">{}</a>').format(message, link[0], link[1])
        super().__init__(
            message,
            reason=reason,
            status_code=status_code,
            log_message=log_message,
            message_html=str(html),
        )
        self.credit = credit
        self.jupyterhub_message = message
        self.jupyterhub_html_message = str(html)

    def __str__(self) -> str:
        return str(self.message)
