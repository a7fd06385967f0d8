"""The Flask application: access checks before every request, the pages (pages.py) and the
JSON API (api.py)."""
from __future__ import annotations

import datetime as dt
import secrets

from flask import Flask, g, jsonify, make_response, redirect, render_template, request, url_for
from werkzeug.exceptions import HTTPException

from .. import config
from . import api, charts, pages, security
from .data import Console, NotFound
from .params import BadInput

#: Seconds between reloads of the queues and workers pages (meta refresh).
REFRESH_SECONDS = 10
_SESSION_ENDPOINTS = ("pages.login", "pages.logout")


def create_app(console: Console, access: security.Access = security.Access()) -> Flask:
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=secrets.token_bytes(32),  # sessions last as long as the process
        SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Strict",
        SESSION_COOKIE_NAME="kombu_pg_web", JSON_SORT_KEYS=False)
    app.extensions["kombu_pg"] = console
    app.extensions["kombu_pg.access"] = access
    app.register_blueprint(pages.blueprint)
    app.register_blueprint(api.blueprint, url_prefix="/api")

    @app.before_request
    def check_access():
        is_api = request.path.startswith("/api/")
        g.who = access.who(request)
        # Logging in and out changes nothing in the broker: allowed in read-only mode too.
        session_only = request.endpoint in _SESSION_ENDPOINTS
        if request.method == "POST" and not session_only and not access.writable:
            why = ("the console is read-only" if access.read_only else
                   "the console was started without a token or basic auth: read-only")
            return _refuse(is_api, 403, why)
        if access.protected and g.who is None and not session_only and request.endpoint != "static":
            if is_api or not access.token:
                response = _refuse(is_api, 401, "authentication required: send the token as "
                                   "'Authorization: Bearer <token>', or basic auth")
                if access.user:
                    response.headers["WWW-Authenticate"] = 'Basic realm="kombu-pg"'
                return response
            target = request.full_path if request.query_string else request.path
            return redirect(url_for("pages.login", next=target))
        if request.method == "POST" and not session_only:
            if is_api:
                if g.who != "token" and not (g.who or "").startswith("basic:"):
                    return _refuse(True, 401, "API changes need the Authorization header")
                if not request.is_json:
                    return _refuse(True, 415, "send a JSON body (Content-Type: application/json)")
            elif not security.csrf_ok(request):
                return _refuse(False, 403, "the form's CSRF token is missing or stale: reload the page")
        return None

    @app.errorhandler(BadInput)
    def bad_input(exc):
        return _refuse(request.path.startswith("/api/"), 400, str(exc))

    @app.errorhandler(NotFound)
    def not_found(exc):
        return _refuse(request.path.startswith("/api/"), 404, str(exc.args[0]))

    @app.errorhandler(config.ConfigurationError)
    def not_ready(exc):  # the schema has no broker tables, or lacks migrations
        return _refuse(request.path.startswith("/api/"), 503, str(exc))

    @app.errorhandler(HTTPException)
    def http_error(exc):
        return _refuse(request.path.startswith("/api/"), exc.code or 500, exc.description or exc.name)

    @app.context_processor
    def helpers():
        return {"writable": access.writable, "read_only": access.read_only, "protected": access.protected,
                "who": g.get("who"), "csrf_token": security.csrf_token, "database": console.description,
                "schema": console.schema, "sparkline": charts.sparkline, "ago": ago, "when": when,
                "refresh_seconds": REFRESH_SECONDS}

    return app


def _refuse(is_api: bool, status: int, message: str):
    if is_api:
        response = jsonify({"error": message, "status": status})
    else:
        response = make_response(render_template("error.html", status=status, message=message))
    response.status_code = status
    return response


def ago(value: dt.datetime | float | None) -> str:
    """How long ago (a datetime) or how long (seconds), short: 42s, 5m 3s, 2h 10m, 3d 4h."""
    if value is None:
        return "-"
    seconds = value if isinstance(value, (int, float)) else (
        dt.datetime.now(dt.timezone.utc) - value).total_seconds()
    seconds = max(int(seconds), 0)
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if seconds >= size:
            rest = (seconds % size) // sub_size
            return f"{seconds // size}{unit}" + (f" {rest}{sub}" if rest else "")
    return f"{seconds}s"


def when(value: dt.datetime | None) -> str:
    return "-" if value is None else f"{value:%Y-%m-%d %H:%M:%S %Z}".strip()
