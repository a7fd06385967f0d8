"""``kombu-pg migrate`` and ``kombu-pg grants``: the broker schema, and what runtime roles may do in it."""
from __future__ import annotations

import click

from .. import config, grants
from .. import migrate as migrations
from ..store import store_for
from .common import Duration, run, schema, target, target_options


@click.command(help="Create or upgrade the broker tables (idempotent).")
@click.option("--lock-timeout", type=Duration(), default=config.Options.migrate_lock_timeout,
              show_default=True, help="How long to wait for another session's migration lock.")
@target_options
@click.pass_context
def migrate(ctx: click.Context, lock_timeout: float) -> None:
    where = target(ctx)
    admin = where.admin()

    def apply() -> list[int]:
        with admin.connect() as conn:
            return migrations.migrate(conn, where.schema, lock_timeout)

    applied = run(apply)
    if applied:
        click.echo(f"schema {where.schema}: applied migrations {', '.join(f'{v:04d}' for v in applied)}")
    else:
        click.echo(f"schema {where.schema}: up to date")


@click.command("grants", help="Print the GRANT statements a runtime role (workers, producers, beat, "
                              "stats, dlq) needs on the migrated schema; --apply runs them.")
@click.argument("role")
@click.option("--apply", "apply_them", is_flag=True, help="Run them (as the schema's owner), all or none.")
@target_options
@click.pass_context
def grants_command(ctx: click.Context, role: str, apply_them: bool) -> None:
    if not apply_them:  # printing needs no database
        click.echo("\n".join(f"{s};" for s in grants.statements(schema(ctx), role)))
        return
    where = target(ctx)
    admin = where.admin()

    def apply() -> list[str]:
        with admin.connect() as conn:
            return store_for(where.schema).grant(conn, role=role)

    for statement in run(apply):
        click.echo(f"{statement};")
    click.echo(f"role {role}: granted the runtime privileges on schema {where.schema}")
