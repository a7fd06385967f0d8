"""``celery -A app pg …``: the kombu-pg commands, for the app's own broker URL and schema."""
from __future__ import annotations

import functools

import click
from celery.bin.base import handle_preload_options

from kombu_pg import cli as pg_cli
from kombu_pg import config

from . import revoke


@click.group(name="pg", help="kombu-pg broker commands (migrate, grants, stats, dlq, task, revoke, purge, beat, metrics, web) for this app's broker.")
@click.pass_context
@handle_preload_options
def pg(ctx):
    app = ctx.obj.app
    url = app.conf.broker_url
    # postgresql+psycopg:// passes here, to be refused by the command with the URL to write.
    if not isinstance(url, str) or url.partition("://")[0].partition("+")[0].lower() not in config.SCHEMES:
        raise click.UsageError(f"this app's broker is not PostgreSQL ({config.mask_url(str(url))})")
    schema = (app.conf.broker_transport_options or {}).get("schema", config.Options.schema)
    pg_cli.use_app_broker(ctx, pg_cli.AppBroker(pg_cli.Target(url, schema),
                                                functools.partial(revoke.mark_revoked, app)))


for _command in pg_cli.COMMANDS:
    pg.add_command(_command)
