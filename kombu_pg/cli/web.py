"""``kombu-pg web``: the operator's web console (kombu_pg.web), served by waitress until
SIGINT/SIGTERM (needs the ``web`` extra)."""
from __future__ import annotations

import logging
import os

import click

from .common import run, target, target_options

TOKEN_ENV, BASIC_AUTH_ENV = "KOMBU_PG_WEB_TOKEN", "KOMBU_PG_WEB_BASIC_AUTH"


@click.command("web", help="Serve the operator's web console: queues and rates, dead letters "
                           "(replay, purge), beat (pause, resume, run now), lease holders, task "
                           "lookup, and a JSON API under /api/.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: all interfaces; then use a token or basic auth).")
@click.option("--port", type=click.IntRange(0, 65535), default=5555, show_default=True,
              help="Port to listen on (0: any free port).")
@click.option("--read-only", is_flag=True, help="Show only: no replay, purge, pause or run.")
@click.option("--token", envvar=TOKEN_ENV, default=None,
              help=f"Token needed for every request and any change (env {TOKEN_ENV}; prefer the "
                   "variable: arguments show in ps).")
@click.option("--basic-auth", envvar=BASIC_AUTH_ENV, default=None, metavar="USER:PASSWORD",
              help=f"Basic auth instead of (or besides) a token (env {BASIC_AUTH_ENV}).")
@target_options
@click.pass_context
def web(ctx: click.Context, host: str, port: int, read_only: bool, token: str | None,
        basic_auth: str | None) -> None:
    try:
        import waitress

        from ..web.app import create_app
        from ..web.data import Console
        from ..web.security import Access
    except ImportError as exc:
        raise click.ClickException(f"{exc}: install the extra, pip install 'kombu-pg[web]'") from None
    user = password = None
    if basic_auth:
        user, sep, password = basic_auth.partition(":")
        if not sep or not user or not password:
            raise click.UsageError("--basic-auth takes USER:PASSWORD, both non-empty")
    where = target(ctx)
    console = run(Console, where.url, where.schema)
    run(console.admin.stats)  # an unreachable server or unmigrated schema: one line, now
    access = Access(token=token or None, user=user, password=password, read_only=read_only)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = waitress.create_server(create_app(console, access), host=host, port=port, threads=4,
                                    ident="kombu-pg")
    mode = ("read-only" if not access.writable else
            "changes need the " + " or ".join(filter(None, ("token" if token else "", "basic auth" if user else ""))))
    click.echo(f"kombu-pg web: serving http://{_url_host(host)}:{server.effective_port}/ for "
               f"{console.description} (schema {where.schema}; {mode}); pid {os.getpid()}")
    if host not in ("127.0.0.1", "::1", "localhost") and not access.protected:
        click.echo(f"kombu-pg web: warning: listening on {host} without a token or basic auth: "
                   "anyone who can reach it sees task names, arguments and errors", err=True)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
