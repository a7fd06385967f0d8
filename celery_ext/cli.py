"""``celery -A app pg …``: the kombu-pg commands, with the URL and schema taken from the app."""
from __future__ import annotations

import click
from celery.bin.base import CeleryCommand, handle_preload_options

from kombu_pg import cli as pg_cli
from kombu_pg import config


@click.group(name="pg", cls=click.Group, help="kombu-pg broker commands for this app's broker.")
@click.pass_context
@handle_preload_options
def pg(ctx):
    pass


@pg.command(cls=CeleryCommand, help="Create or upgrade the broker tables of this app.")
@click.pass_context
def migrate(ctx):
    app = ctx.obj.app
    schema = (app.conf.broker_transport_options or {}).get("schema", config.Options.schema)
    ctx.invoke(pg_cli.migrate, url=app.conf.broker_url, schema=schema)
