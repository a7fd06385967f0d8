"""``kombu-pg stats``, ``task``, ``revoke`` and ``purge``: the queues and the tasks in them."""
from __future__ import annotations

import dataclasses
import json

import click

from .. import config
from .common import Duration, app_broker, confirmed, run, schema, target, target_options, when


@click.command(help="Per queue: ready, delayed and leased messages, oldest ready age; dead letters by reason.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@target_options
@click.pass_context
def stats(ctx: click.Context, as_json: bool) -> None:
    data = run(target(ctx).admin().stats)
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


@click.command("task", help="Where a task is: waiting since / delayed until, leased by which worker "
                            "since when, attempt n of max with its errors, dead-lettered, revoked, "
                            "or not found (acked, or never seen).")
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@target_options
@click.pass_context
def task_command(ctx: click.Context, task_id: str, as_json: bool) -> None:
    found = run(target(ctx).admin().task, task_id)
    if as_json:
        click.echo(json.dumps(dict(dataclasses.asdict(found), state=found.state), indent=2, default=str))
        return
    click.echo(f"task {task_id}: {found.state.replace('_', ' ')}")
    for m in found.messages:
        click.echo(f"  message {m.message_id} in queue {m.queue!r} ({m.task_name or 'no task name'}), "
                   f"priority {m.priority}, enqueued {when(m.enqueued_at)}")
        if m.state == "leased":
            who = f"{m.worker} (pid {m.pid})" if m.pid else (m.leased_by or "a worker of an earlier version")
            click.echo(f"    leased by {who} since {when(m.leased_at)}, lease until {when(m.leased_until)}")
            click.echo(f"    attempt {m.attempts} of {m.max_attempts}")
        else:
            click.echo(f"    {'waiting since' if m.state == 'ready' else 'delayed until'} {when(m.visible_at)}")
            click.echo(f"    {m.attempts} attempt(s) made of {m.max_attempts}")
        if m.expires_at:
            click.echo(f"    expires {when(m.expires_at)}")
        for n, error in enumerate(m.errors, 1):
            click.echo(f"    error {n}: {error.get('at')} {error.get('type')}: {error.get('message')}"
                       + (f" ({error['worker']})" if error.get("worker") else ""))
    for d in found.dead_letters:
        replayed = f", replayed {when(d.replayed_at)}" if d.replayed_at else ""
        error = f": {d.last_error_type}: {d.last_error}" if d.last_error_type else ""
        click.echo(f"  dead letter {d.id} (queue {d.queue!r}): {d.reason} after {d.attempts} "
                   f"attempt(s), {when(d.dead_lettered_at)}{replayed}{error}")
    if found.revoked:
        click.echo(f"  revoked {when(found.revoked.revoked_at)} by {found.revoked.revoked_by or '-'}, "
                   f"kept until {when(found.revoked.expires_at)}")
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
def revoke_command(ctx: click.Context, task_ids: tuple[str, ...], expires: float) -> None:
    if not expires > 0:
        raise click.UsageError("--expires must be more than 0")
    app = app_broker(ctx)  # under `celery -A app pg`, removed tasks are marked REVOKED in its backend now
    outcomes = run(target(ctx).admin().revoke, task_ids, expires=expires, marked=app is not None)
    if app is not None:
        app.mark_revoked(sorted({o.task_id for o in outcomes if o.removed}))
    for task_id in task_ids:
        mine = [o for o in outcomes if o.task_id == task_id]
        for o in mine:
            if o.removed:
                click.echo(f"{task_id}: removed its {o.state} message {o.message_id} from queue {o.queue!r}")
            else:
                click.echo(f"{task_id}: message {o.message_id} in queue {o.queue!r} is leased by "
                           f"{o.leased_by or 'a worker'} since {when(o.leased_at)}: left to it "
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
def purge_command(ctx: click.Context, queues: tuple[str, ...], delayed: bool, leased: bool, force: bool,
                  yes: bool) -> None:
    if leased and not force:
        raise click.UsageError("--leased deletes messages whose tasks workers are running "
                               "(their results may never be stored): add --force")
    admin = target(ctx).admin()
    names = list(dict.fromkeys(queues))
    counts = run(admin.queue_counts, names)
    unknown = [c.queue for c in counts if not c.known]
    if unknown:
        raise click.ClickException(f"no queue {', '.join(map(repr, unknown))} in schema "
                                   f"{schema(ctx)}: `kombu-pg stats` lists the queues")
    click.echo(f"{'QUEUE':<40} {'READY':>8} {'DELAYED':>8} {'LEASED':>8}")
    for c in counts:
        click.echo(f"{c.queue:<40} {c.ready:>8} {c.delayed:>8} {c.leased:>8}")
    kinds = ["ready"] + (["delayed"] if delayed else []) + (["leased"] if leased else [])
    total = sum(getattr(c, kind) for c in counts for kind in kinds)
    if not yes and not confirmed(f"delete about {total} {', '.join(kinds)} message(s)?"):
        raise click.ClickException("nothing deleted")
    gone = run(admin.purge_queues, names, delayed=delayed, leased=leased)
    for queue, n in gone.items():
        click.echo(f"{queue}: deleted " + ", ".join(f"{n[kind]} {kind}" for kind in kinds))
