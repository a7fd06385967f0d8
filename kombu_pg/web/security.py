"""Who may do what in the console.

* Without credentials (no token, no basic auth) or with ``read_only``, nothing can be changed:
  the pages show no forms and every POST answers 403.
* With a token or basic auth, every request must carry them: the API in an ``Authorization``
  header (``Bearer <token>``, or ``Basic``), the pages by basic auth or by a login form that
  puts the token's check in the session cookie (signed, HttpOnly, SameSite=Strict).
* Every POST of a page carries the session's CSRF token in a hidden field, checked against the
  session; a POST of the API needs a JSON body (a cross-site form cannot send one) and the
  ``Authorization`` header.
* Credentials are compared in constant time and never logged; the actions are, with who did
  them (see :func:`log_action`).
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import hmac
import logging
import secrets

from flask import Request, session

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Access:
    token: str | None = None
    user: str | None = None
    password: str | None = None
    read_only: bool = False

    @property
    def protected(self) -> bool:
        return bool(self.token or self.user)

    @property
    def writable(self) -> bool:
        """Whether anything can be changed at all (credentials configured, not read-only)."""
        return self.protected and not self.read_only

    def who(self, request: Request) -> str | None:
        """The authenticated caller ("token", "basic:<user>", "session"), or None."""
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if self.token and scheme.lower() == "bearer" and _same(value.strip(), self.token):
            return "token"
        if self.user and scheme.lower() == "basic":
            user, password = _basic(value.strip())
            if user is not None and _same(user, self.user) and _same(password, self.password or ""):
                return f"basic:{user}"
        if self.token and session.get("login") == _login_mark(self.token):
            return "session"
        return None

    def check_token(self, candidate: str) -> bool:
        return self.token is not None and _same(candidate, self.token)

    def log_in(self) -> None:
        session.clear()
        session["login"] = _login_mark(self.token or "")
        session["csrf"] = secrets.token_urlsafe(32)


def csrf_token() -> str:
    """This session's CSRF token (made on first use)."""
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(32)
    return session["csrf"]


def csrf_ok(request: Request) -> bool:
    expected = session.get("csrf")
    given = request.form.get("csrf_token", "")
    return isinstance(expected, str) and bool(expected) and _same(given, expected)


def log_action(who: str, request: Request, what: str, count: int | None = None) -> None:
    logger.info("kombu-pg web: %s from %s: %s%s", who, request.remote_addr, what,
                "" if count is None else f": {count}")


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def _basic(value: str) -> tuple[str | None, str]:
    try:
        user, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None, ""
    return (user, password) if sep else (None, "")


def _login_mark(token: str) -> str:
    """What the session keeps after a login: a digest, never the token itself (the cookie is
    signed, not encrypted)."""
    return hmac.new(b"kombu-pg web login", token.encode(), "sha256").hexdigest()
