"""The ``kombu-pg`` command line (also mounted as ``celery -A app pg …``)."""
from __future__ import annotations

import dataclasses
import json
import re
import sys

import click
import psycopg

from . import beat_admin, config, grants
from . import migrate as migrations
from .admin import REASONS, Admin, Filter

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class Duration(click.ParamType):
    name = "duration"

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)):
            return float(value)
        match = _DURATION.match(str(value))
        if not match:
            self.fail(f"{value!r} is not a duration such as 90, 30s, 15m, 2h, 7d", param, ctx)
        return float(match.group(1)) * _UNITS[match.group(2)]


@dataclasses.dataclass
class Target:
    url: str
    schema: str

    def admin(self) -> Admin:
        try:
            return Admin(self.url, self.schema)
        except config.ConfigurationError as exc:
            raise click.ClickException(str(exc)) from None


def _remember(ctx, param, value):
    if value is not None:
        ctx.meta[f"kombu_pg.{param.name}"] = value
    return value


def target_options(f):
    """--url/--schema, accepted before or after the command name."""
    f = click.option("--schema", callback=_remember, expose_value=False, envvar="KOMBU_PG_SCHEMA",
                     help=f"PostgreSQL schema of the broker tables [default: {config.Options.schema}].")(f)
    return click.option("--url", callback=_remember, expose_value=False, envvar="KOMBU_PG_URL",
                        help="Broker URL, postgresql://user:pass@host:port/db (env KOMBU_PG_URL).")(f)


def _target(ctx: click.Context) -> Target:
    app_target = ctx.meta.get("kombu_pg.target")  # set by `celery -A app pg`
    url = ctx.meta.get("kombu_pg.url") or (app_target.url if app_target else None)
    if not url:
        raise click.UsageError("no broker URL: pass --url or set KOMBU_PG_URL")
    return Target(url, _schema(ctx))


def _schema(ctx: click.Context) -> str:
    app_target = ctx.meta.get("kombu_pg.target")
    return ctx.meta.get("kombu_pg.schema") or (app_target.schema if app_target else config.Options.schema)


def _run(fn, *args, **kwargs):
    """Operational errors as one line, without the password."""
    try:
        return fn(*args, **kwargs)
    except (psycopg.Error, config.ConfigurationError) as exc:
        raise click.ClickException(" ".join(str(exc).split())) from None


@click.group(help="Manage a kombu-pg PostgreSQL broker.")
@target_options
def main():
    pass


@click.command(help="Create or upgrade the broker tables (idempotent).")
@click.option("--lock-timeout", type=Duration(), default=config.Options.migrate_lock_timeout,
              show_default=True, help="How long to wait for another session's migration lock.")
@target_options
@click.pass_context
def migrate(ctx, lock_timeout):
    target = _target(ctx)
    admin = target.admin()

    def apply():
        with admin.connect() as conn:
            return migrations.migrate(conn, target.schema, lock_timeout)

    applied = _run(apply)
    if applied:
        click.echo(f"schema {target.schema}: applied migrations {', '.join(f'{v:04d}' for v in applied)}")
    else:
        click.echo(f"schema {target.schema}: up to date")


@click.command("grants", help="Print the GRANT statements a runtime role (workers, producers, beat, "
                              "stats, dlq) needs on the migrated schema; --apply runs them.")
@click.argument("role")
@click.option("--apply", "apply_them", is_flag=True, help="Run them (as the schema's owner), all or none.")
@target_options
@click.pass_context
def grants_command(ctx, role, apply_them):
    if not apply_them:  # printing needs no database
        click.echo("\n".join(f"{s};" for s in grants.statements(_schema(ctx), role)))
        return
    target = _target(ctx)
    admin = target.admin()

    def apply():
        with admin.connect() as conn:
            return grants.apply(conn, target.schema, role)

    for statement in _run(apply):
        click.echo(f"{statement};")
    click.echo(f"role {role}: granted the runtime privileges on schema {target.schema}")


@click.command(help="Per queue: ready, delayed and leased messages, oldest ready age; dead letters by reason.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@target_options
@click.pass_context
def stats(ctx, as_json):
    data = _run(_target(ctx).admin().stats)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"{'QUEUE':<40} {'READY':>8} {'DELAYED':>8} {'LEASED':>8} {'OLDEST READY':>13}")
    for q in data["queues"]:
        age = "-" if q["oldest_ready_age_s"] is None else f"{q['oldest_ready_age_s']:.1f}s"
        click.echo(f"{q['queue']:<40} {q['ready']:>8} {q['delayed']:>8} {q['leased']:>8} {age:>13}")
    click.echo("")
    click.echo(f"{'DEAD LETTERS: QUEUE':<40} {'REASON':<16} {'COUNT':>8}")
    for d in data["dead_letters"]:
        click.echo(f"{d['queue']:<40} {d['reason']:<16} {d['count']:>8}")


def _filter_options(f):
    for option in reversed([
        click.option("--queue", help="Only this queue."),
        click.option("--task", help="Only this task name."),
        click.option("--reason", type=click.Choice(REASONS), help="Only this reason."),
        click.option("--older-than", type=Duration(), help="Dead-lettered longer ago than this (30s, 2h, 7d)."),
        click.option("--newer-than", type=Duration(), help="Dead-lettered within this long."),
    ]):
        f = option(f)
    return f


@click.group(help="Dead letters: messages that could not be processed.")
def dlq():
    pass


@dlq.command("list", help="List dead letters, oldest first (keyset pagination with --after).")
@_filter_options
@click.option("--replayed/--not-replayed", default=None, help="Only replayed / not yet replayed ones.")
@click.option("--after", type=int, default=0, show_default=True, help="Start after this id.")
@click.option("--limit", type=click.IntRange(1, 10000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
@target_options
@click.pass_context
def dlq_list(ctx, queue, task, reason, older_than, newer_than, replayed, after, limit, as_json):
    rows = _run(_target(ctx).admin().dead_letters, Filter(queue, task, reason, older_than, newer_than, replayed),
                after=after, limit=limit)
    if as_json:
        for row in rows:
            click.echo(json.dumps(dataclasses.asdict(row), default=str))
        return
    click.echo(f"{'ID':>6} {'QUEUE':<20} {'TASK':<30} {'REASON':<14} {'ATT':>4} {'DEAD-LETTERED':<20} LAST ERROR")
    for r in rows:
        error = f"{r.last_error_type}: {r.last_error}" if r.last_error_type else ""
        replayed_mark = " (replayed)" if r.replayed_at else ""
        click.echo(f"{r.id:>6} {r.queue[:20]:<20} {(r.task_name or '-')[:30]:<30} {r.reason:<14} "
                   f"{r.attempts:>4} {r.dead_lettered_at:%Y-%m-%d %H:%M:%S} {error[:80]}{replayed_mark}")
    if len(rows) == limit:
        click.echo(f"-- more: --after {rows[-1].id}")


@dlq.command("show", help="Show one dead letter: message, headers, error history.")
@click.argument("dead_letter_id", type=int)
@target_options
@click.pass_context
def dlq_show(ctx, dead_letter_id):
    letter = _run(_target(ctx).admin().dead_letter, dead_letter_id)
    if letter is None:
        raise click.ClickException(f"no dead letter with id {dead_letter_id}")
    click.echo(json.dumps(dataclasses.asdict(letter), indent=2, default=str))


@dlq.command("replay", help="Put dead letters back on their queues (one transaction): the given "
                            "ids, or --all matching the filters. Attempts start again; history is kept.")
@click.argument("ids", type=int, nargs=-1)
@_filter_options
@click.option("--all", "replay_all", is_flag=True, help="Replay every dead letter matching the filters.")
@target_options
@click.pass_context
def dlq_replay(ctx, ids, queue, task, reason, older_than, newer_than, replay_all):
    if not ids and not replay_all:
        raise click.UsageError("give dead letter ids, or --all (with optional filters)")
    admin = _target(ctx).admin()
    if ids:
        _check_replayable(admin, sorted(set(ids)))
    selection = Filter(queue, task, reason, older_than, newer_than, replayed=False, ids=list(ids) or None)
    total = _run(admin.count, selection)
    with click.progressbar(length=total, label="replaying", file=sys.stderr) as bar:
        replayed = _run(admin.replay, selection, progress=bar.update)
    click.echo(f"replayed {replayed} dead letter(s)")
    if ids and replayed < len(set(ids)):
        raise click.ClickException(f"replayed {replayed} of the {len(set(ids))} dead letters given: "
                                   "the others do not match the filters, or were replayed meanwhile")


def _check_replayable(admin: Admin, ids: list[int]) -> None:
    """Every id given names a dead letter not replayed yet; otherwise nothing is replayed."""
    found = {row.id: row for row in _run(admin.dead_letters, Filter(ids=ids), limit=len(ids))}
    problems = []
    unknown = [i for i in ids if i not in found]
    if unknown:
        problems.append(f"no dead letter with id {', '.join(map(str, unknown))}")
    done = [i for i in ids if i in found and found[i].replayed_at]
    if done:
        problems.append(f"dead letter {', '.join(map(str, done))} already replayed (a replayed "
                        "message that fails again comes back as a new dead letter: see dlq list)")
    if problems:
        raise click.ClickException("; ".join(problems) + "; nothing replayed")


@dlq.command("purge", help="Delete dead letters older than a duration, or already replayed ones.")
@_filter_options
@click.option("--replayed", is_flag=True, help="Only dead letters that were replayed.")
@click.option("--all", "purge_all", is_flag=True, help="Needed to purge without --older-than/--replayed.")
@target_options
@click.pass_context
def dlq_purge(ctx, queue, task, reason, older_than, newer_than, replayed, purge_all):
    if older_than is None and not replayed and not purge_all:
        raise click.UsageError("give --older-than DURATION, --replayed, or --all")
    deleted = _run(_target(ctx).admin().purge,
                   Filter(queue, task, reason, older_than, newer_than, replayed=True if replayed else None))
    click.echo(f"purged {deleted} dead letter(s)")


@click.command("metrics", help="Serve Prometheus metrics of the broker on /metrics: per queue ready, "
                                "delayed and leased messages, oldest ready age; dead letters by reason.")
@click.option("--port", type=click.IntRange(0, 65535), default=9808, show_default=True,
              help="Port to listen on (0: any free port).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: all interfaces).")
@target_options
@click.pass_context
def metrics_command(ctx, port, host):
    target = _target(ctx)
    target.admin()  # a broken URL fails here, in one line
    try:
        from . import metrics as exporter
    except ImportError as exc:
        raise click.ClickException(f"{exc}: install the extra, pip install 'kombu-pg[metrics]'") from None
    try:
        exporter.serve_forever(target.url, target.schema, port=port, host=host, echo=click.echo)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc}") from None


COMMANDS = (migrate, grants_command, stats, dlq, metrics_command, beat_admin.build())
for _command in COMMANDS:
    main.add_command(_command)


if __name__ == "__main__":
    sys.exit(main())
