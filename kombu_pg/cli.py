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
from .web import server as web_server

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
    if sys.stderr.isatty():  # a bar for people; scripts and logs get the one line below
        with click.progressbar(length=total, label="replaying", file=sys.stderr) as bar:
            replayed = _run(admin.replay, selection, progress=bar.update)
    else:
        replayed = _run(admin.replay, selection)
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


def _confirmed(question: str) -> bool:
    """The answer to ``question``; no answer (no terminal, end of input) is no."""
    try:
        return click.confirm(question, default=False)
    except click.Abort:
        click.echo("")
        return False


def _when(value) -> str:
    return "-" if value is None else f"{value:%Y-%m-%d %H:%M:%S %Z}".strip()


@click.command("task", help="Where a task is: waiting since / delayed until, leased by which worker "
                            "since when, attempt n of max with its errors, dead-lettered, revoked, "
                            "or not found (acked, or never seen).")
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@target_options
@click.pass_context
def task_command(ctx, task_id, as_json):
    found = _run(_target(ctx).admin().task, task_id)
    if as_json:
        click.echo(json.dumps(dict(dataclasses.asdict(found), state=found.state), indent=2, default=str))
        return
    click.echo(f"task {task_id}: {found.state.replace('_', ' ')}")
    for m in found.messages:
        click.echo(f"  message {m.message_id} in queue {m.queue!r} ({m.task_name or 'no task name'}), "
                   f"priority {m.priority}, enqueued {_when(m.enqueued_at)}")
        if m.state == "leased":
            who = f"{m.worker} (pid {m.pid})" if m.pid else (m.leased_by or "a worker of an earlier version")
            click.echo(f"    leased by {who} since {_when(m.leased_at)}, lease until {_when(m.leased_until)}")
            click.echo(f"    attempt {m.attempts} of {m.max_attempts}")
        else:
            click.echo(f"    {'waiting since' if m.state == 'ready' else 'delayed until'} {_when(m.visible_at)}")
            click.echo(f"    {m.attempts} attempt(s) made of {m.max_attempts}")
        if m.expires_at:
            click.echo(f"    expires {_when(m.expires_at)}")
        for n, error in enumerate(m.errors, 1):
            click.echo(f"    error {n}: {error.get('at')} {error.get('type')}: {error.get('message')}"
                       + (f" ({error['worker']})" if error.get("worker") else ""))
    for d in found.dead_letters:
        replayed = f", replayed {_when(d.replayed_at)}" if d.replayed_at else ""
        error = f": {d.last_error_type}: {d.last_error}" if d.last_error_type else ""
        click.echo(f"  dead letter {d.id} (queue {d.queue!r}): {d.reason} after {d.attempts} "
                   f"attempt(s), {_when(d.dead_lettered_at)}{replayed}{error}")
    if found.revoked:
        click.echo(f"  revoked {_when(found.revoked.revoked_at)} by {found.revoked.revoked_by or '-'}, "
                   f"kept until {_when(found.revoked.expires_at)}")
    if found.state == "not_found":
        click.echo("  no message, dead letter or revoke: acked (done), or never published to this schema")


@click.command("revoke", help="Revoke tasks durably, without a running worker: remove their waiting "
                              "(ready or delayed) messages and record the ids, so that no worker runs "
                              "them, one started later included. Leased ones are being run or held by "
                              "a worker: `celery control revoke` reaches it.")
@click.argument("task_ids", nargs=-1, required=True)
@click.option("--expires", type=Duration(), default=config.Options.revoke_expires, show_default=True,
              help="How long workers drop these tasks (30m, 3h, 7d).")
@target_options
@click.pass_context
def revoke_command(ctx, task_ids, expires):
    if not expires > 0:
        raise click.UsageError("--expires must be more than 0")
    # Set by `celery -A app pg`: marks removed tasks REVOKED in the app's result backend now.
    mark = ctx.meta.get("kombu_pg.mark_revoked")
    outcomes = _run(_target(ctx).admin().revoke, task_ids, expires=expires, marked=mark is not None)
    if mark is not None:
        mark(sorted({o.task_id for o in outcomes if o.removed}))
    for task_id in task_ids:
        mine = [o for o in outcomes if o.task_id == task_id]
        for o in mine:
            if o.removed:
                click.echo(f"{task_id}: removed its {o.state} message {o.message_id} from queue {o.queue!r}")
            else:
                click.echo(f"{task_id}: message {o.message_id} in queue {o.queue!r} is leased by "
                           f"{o.leased_by or 'a worker'} since {_when(o.leased_at)}: left to it "
                           "(`celery control revoke` tells running workers)")
        if not mine:
            click.echo(f"{task_id}: no waiting message (done, or not published yet)")
    click.echo(f"revoked {len(set(task_ids))} task id(s) for {expires:g} s")


@click.command("purge", help="Delete the ready messages of queues (as `celery purge`); --delayed also "
                             "those waiting for an ETA, countdown or retry backoff; --leased --force "
                             "also those workers hold. Shows the counts per queue and asks first.")
@click.argument("queues", nargs=-1, required=True)
@click.option("--delayed", is_flag=True, help="Also delayed messages (ETA, countdown, retry backoff).")
@click.option("--leased", is_flag=True, help="Also leased messages: workers still run them (needs --force).")
@click.option("--force", is_flag=True, help="Needed with --leased.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@target_options
@click.pass_context
def purge_command(ctx, queues, delayed, leased, force, yes):
    if leased and not force:
        raise click.UsageError("--leased deletes messages whose tasks workers are running "
                               "(their results may never be stored): add --force")
    admin = _target(ctx).admin()
    queues = list(dict.fromkeys(queues))
    counts = _run(admin.queue_counts, queues)
    unknown = [c.queue for c in counts if not c.known]
    if unknown:
        raise click.ClickException(f"no queue {', '.join(map(repr, unknown))} in schema "
                                   f"{_schema(ctx)}: `kombu-pg stats` lists the queues")
    click.echo(f"{'QUEUE':<40} {'READY':>8} {'DELAYED':>8} {'LEASED':>8}")
    for c in counts:
        click.echo(f"{c.queue:<40} {c.ready:>8} {c.delayed:>8} {c.leased:>8}")
    kinds = ["ready"] + (["delayed"] if delayed else []) + (["leased"] if leased else [])
    total = sum(getattr(c, kind) for c in counts for kind in kinds)
    if not yes and not _confirmed(f"delete about {total} {', '.join(kinds)} message(s)?"):
        raise click.ClickException("nothing deleted")
    gone = _run(admin.purge_queues, queues, delayed=delayed, leased=leased)
    for queue, n in gone.items():
        click.echo(f"{queue}: deleted " + ", ".join(f"{n[kind]} {kind}" for kind in kinds))


COMMANDS = (migrate, grants_command, stats, dlq, metrics_command, task_command, revoke_command,
            purge_command, beat_admin.build(), web_server.command(sys.modules[__name__]))
for _command in COMMANDS:
    main.add_command(_command)


if __name__ == "__main__":
    sys.exit(main())
