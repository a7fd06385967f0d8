"""What every ``kombu-pg`` command shares: where the broker is (--url/--schema, or the Celery
app of ``celery -A app pg``), durations as arguments, and operational errors as one line."""
from __future__ import annotations

import dataclasses
import datetime as dt
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click
import psycopg

from .. import config
from ..admin import Admin

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
#: ctx.meta keys: the options as given (before or after the command name), and the app's broker.
_URL, _SCHEMA, _APP = "kombu_pg.url", "kombu_pg.schema", "kombu_pg.app_broker"


class Duration(click.ParamType):
    """Seconds, or a number with a unit: 90, 30s, 15m, 2h, 7d, 1w."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, (int, float)):
            return float(value)
        match = _DURATION.match(str(value))
        if not match:
            self.fail(f"{value!r} is not a duration such as 90, 30s, 15m, 2h, 7d", param, ctx)
        return float(match.group(1)) * _UNITS[match.group(2)]


@dataclasses.dataclass
class Target:
    """The broker a command works on."""

    url: str
    schema: str

    def admin(self) -> Admin:
        try:
            return Admin(self.url, self.schema)
        except config.ConfigurationError as exc:
            raise click.ClickException(str(exc)) from None


@dataclasses.dataclass(frozen=True)
class AppBroker:
    """The broker of a Celery app (``celery -A app pg``): the target when --url/--schema are not
    given, and how to mark tasks REVOKED in the app's result backend."""

    target: Target
    mark_revoked: Callable[[Sequence[str]], None]


def use_app_broker(ctx: click.Context, app_broker: AppBroker) -> None:
    """Make ``app_broker`` the default of the commands run under ``ctx``."""
    ctx.meta[_APP] = app_broker


def app_broker(ctx: click.Context) -> AppBroker | None:
    return ctx.meta.get(_APP)


def _remember(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        ctx.meta[_URL if param.name == "url" else _SCHEMA] = value
    return value


def target_options(f: F) -> F:
    """--url/--schema, accepted before or after the command name."""
    f = click.option("--schema", callback=_remember, expose_value=False, envvar="KOMBU_PG_SCHEMA",
                     help=f"PostgreSQL schema of the broker tables [default: {config.Options.schema}].")(f)
    return click.option("--url", callback=_remember, expose_value=False, envvar="KOMBU_PG_URL",
                        help="Broker URL, postgresql://user:pass@host:port/db (env KOMBU_PG_URL).")(f)


def target(ctx: click.Context) -> Target:
    app = app_broker(ctx)
    url = ctx.meta.get(_URL) or (app.target.url if app else None)
    if not url:
        raise click.UsageError("no broker URL: pass --url or set KOMBU_PG_URL")
    return Target(url, schema(ctx))


def schema(ctx: click.Context) -> str:
    app = app_broker(ctx)
    return ctx.meta.get(_SCHEMA) or (app.target.schema if app else config.Options.schema)


def run(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Operational errors as one line, without the password."""
    try:
        return fn(*args, **kwargs)
    except (psycopg.Error, config.ConfigurationError) as exc:
        raise click.ClickException(" ".join(str(exc).split())) from None


def confirmed(question: str) -> bool:
    """The answer to ``question``; no answer (no terminal, end of input) is no."""
    try:
        return click.confirm(question, default=False)
    except click.Abort:
        click.echo("")
        return False


def when(value: dt.datetime | None) -> str:
    return "-" if value is None else f"{value:%Y-%m-%d %H:%M:%S %Z}".strip()
