"""The ``kombu-pg`` command line."""
from __future__ import annotations

import os
import sys

import click
import psycopg

from . import config, migrate as migrations


def _url_option(f):
    return click.option("--url", envvar="KOMBU_PG_URL", required=True,
                        help="Broker URL, postgresql://user:pass@host:port/db (env KOMBU_PG_URL).")(f)


def _schema_option(f):
    return click.option("--schema", default=config.Options.schema, show_default=True,
                        help="PostgreSQL schema of the broker tables.")(f)


def connect(url: str) -> psycopg.Connection:
    try:
        conninfo = config.to_conninfo(url)
    except config.ConfigurationError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        return psycopg.connect(conninfo, autocommit=True)
    except psycopg.OperationalError as exc:
        raise click.ClickException(
            f"cannot connect to {config.mask_url(url)}: {config.scrub(exc, conninfo)}") from None


@click.group(help="Manage a kombu-pg PostgreSQL broker.")
def main():
    pass


@main.command(help="Create or upgrade the broker tables (idempotent).")
@_url_option
@_schema_option
def migrate(url, schema):
    with connect(url) as conn:
        applied = migrations.migrate(conn, schema)
    if applied:
        click.echo(f"schema {schema}: applied migrations {', '.join(f'{v:04d}' for v in applied)}")
    else:
        click.echo(f"schema {schema}: up to date")


if __name__ == "__main__":
    sys.exit(main())
