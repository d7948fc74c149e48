"""Sign-up as an explicit action: ``/hub/signup``, the password typed twice.

``SignupAuthenticator`` is The Littlest JupyterHub's FirstUseAuthenticator
(bcrypt hashes in a dbm file) with one change of meaning: logging in with a
name the hub does not know creates **no** account (a typo must not make a
second one), and says so in words that do not tell whether the name exists.
Accounts are made on the sign-up page, which asks for the password twice,
says what the sign-up credit is and logs the new user in. Every account but an
admin's is in the hub group ``customers`` (``add_user``), so the hub's groups
and the portal's roles agree.
"""

from __future__ import annotations

import dbm
from typing import Any

import bcrypt
import sqlalchemy
from firstuseauthenticator import FirstUseAuthenticator
from jupyterhub import orm
from jupyterhub.handlers import BaseHandler
from traitlets import Unicode

#: The hub group every account made by sign-up joins; its portal role is ``customer``.
CUSTOMERS_GROUP = "customers"
LOGIN_FAILED = (
    "The name or the password is wrong. New here? Sign up first: logging in "
    "does not create an account."
)


def join_group(db: Any, orm_user: Any, name: str = CUSTOMERS_GROUP) -> None:
    """Add ``orm_user`` to the hub group ``name`` (made if missing); idempotent."""
    group = orm.Group.find(db, name)
    if group is None:
        group = orm.Group(name=name)
        db.add(group)
    if orm_user not in group.users:
        group.users.append(orm_user)
    db.commit()


class SignupHandler(BaseHandler):
    """``GET`` shows the sign-up form; ``POST`` makes the account and logs in."""

    def _render(self, error: str = "", username: str = "") -> Any:
        auth = self.authenticator
        return self.render_template(
            "signup.html",
            signup_error=error,
            username=username,
            min_password_length=auth.min_password_length,
            xsrf=self.xsrf_token.decode("ascii"),
            login_url=self.settings["login_url"],
        )

    async def get(self) -> None:
        if self.current_user:
            self.redirect(self.get_next_url(self.current_user))
            return
        self.finish(await self._render())

    async def post(self) -> None:
        auth: SignupAuthenticator = self.authenticator
        raw = self.get_body_argument("username", "").strip()
        password = self.get_body_argument("password", "")
        again = self.get_body_argument("password_again", "")
        name = auth.normalize_username(raw) if raw else ""
        problem = auth.signup_problem(name, password, again)
        if problem is None and self.find_user(name) is not None:
            problem = "That name is taken. Log in, or choose another name."
        if problem is None and not auth.store_new_password(name, password):
            problem = "That name is taken. Log in, or choose another name."
        if problem is not None:
            self.set_status(400)
            self.finish(await self._render(problem, raw[:255]))
            return
        user = await self.auth_to_user({"name": name})  # add_user: joins `customers`
        self.set_login_cookie(user)
        self.log.info("signed up new user %s", name)
        self.redirect(self.get_next_url(user))


class SignupAuthenticator(FirstUseAuthenticator):
    """FirstUseAuthenticator where only the sign-up page creates accounts."""

    signup_credit_text = Unicode(
        "",
        config=True,
        help="""One sentence on the sign-up credit, shown on the sign-up and login pages,
        e.g. c.SignupAuthenticator.signup_credit_text = "New accounts get 10 credits."
        Empty: nothing is said.""",
    )

    def signup_problem(self, name: str, password: str, again: str) -> str | None:
        """Why this sign-up cannot go ahead, in one sentence; None when it can."""
        if not name:
            return "Choose a user name."
        if not self.validate_username(name):
            return (
                "That user name cannot be used: use letters, digits, '-', '_' or '.', "
                "without spaces or commas."
            )
        if len(password) < self.min_password_length:
            return f"Choose a password of at least {self.min_password_length} characters."
        if password != again:
            return "The two passwords differ; type the same password twice."
        return None

    def store_new_password(self, name: str, password: str) -> bool:
        """Keep the password's hash for a new name; False when the name already has one."""
        key = name.encode("utf8")
        with dbm.open(self.dbm_path, "c", 0o600) as db:
            if db.get(key) is not None:
                return False
            db[key] = bcrypt.hashpw(password.encode("utf8"), bcrypt.gensalt())
        return True

    async def authenticate(self, handler: Any, data: dict[str, Any]) -> str | None:
        name = self.normalize_username(data.get("username", ""))
        if not name or not self._user_exists(name):
            # An unknown name is not an account to make: sign-up is its own page.
            handler.custom_login_error = LOGIN_FAILED
            return None
        result: str | None = await super().authenticate(handler, data)
        if result is None and not getattr(handler, "custom_login_error", ""):
            handler.custom_login_error = LOGIN_FAILED
        return result

    def add_user(self, user: Any) -> Any:
        """Every account but an admin's is in the ``customers`` group, as the portal
        counts it: at sign-up, when an admin makes one, and (for accounts made
        before) at every hub start, which calls this for each user."""
        result = super().add_user(user)
        orm_user = getattr(user, "orm_user", user)
        if not (orm_user.admin or orm_user.name in self.admin_users):
            session = sqlalchemy.inspect(orm_user).session
            if session is not None:
                join_group(session, orm_user)
        return result

    def get_handlers(self, app: Any) -> list[tuple[str, Any]]:
        handlers: list[tuple[str, Any]] = super().get_handlers(app)
        return [*handlers, (r"/signup", SignupHandler)]
