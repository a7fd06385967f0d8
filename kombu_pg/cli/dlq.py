"""``kombu-pg dlq …``: list, show, replay and purge dead letters."""
from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from ..admin import Admin, Filter
from ..reasons import REASONS
from .common import Duration, run, target, target_options

F = TypeVar("F", bound=Callable[..., Any])


def _filter_options(f: F) -> F:
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
def dlq() -> None:
    pass


@dlq.command("list", help="List dead letters, oldest first (keyset pagination with --after).")
@_filter_options
@click.option("--replayed/--not-replayed", default=None, help="Only replayed / not yet replayed ones.")
@click.option("--after", type=int, default=0, show_default=True, help="Start after this id.")
@click.option("--limit", type=click.IntRange(1, 10000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
@target_options
@click.pass_context
def dlq_list(ctx: click.Context, queue: str | None, task: str | None, reason: str | None,
             older_than: float | None, newer_than: float | None, replayed: bool | None, after: int,
             limit: int, as_json: bool) -> None:
    rows = run(target(ctx).admin().dead_letters, Filter(queue, task, reason, older_than, newer_than, replayed),
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
def dlq_show(ctx: click.Context, dead_letter_id: int) -> None:
    letter = run(target(ctx).admin().dead_letter, dead_letter_id)
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
def dlq_replay(ctx: click.Context, ids: tuple[int, ...], queue: str | None, task: str | None,
               reason: str | None, older_than: float | None, newer_than: float | None,
               replay_all: bool) -> None:
    if not ids and not replay_all:
        raise click.UsageError("give dead letter ids, or --all (with optional filters)")
    admin = target(ctx).admin()
    if ids:
        _check_replayable(admin, sorted(set(ids)))
    selection = Filter(queue, task, reason, older_than, newer_than, replayed=False, ids=list(ids) or None)
    total = run(admin.count, selection)
    if sys.stderr.isatty():  # a bar for people; scripts and logs get the one line below
        with click.progressbar(length=total, label="replaying", file=sys.stderr) as bar:
            replayed = run(admin.replay, selection, progress=bar.update)
    else:
        replayed = run(admin.replay, selection)
    click.echo(f"replayed {replayed} dead letter(s)")
    if ids and replayed < len(set(ids)):
        raise click.ClickException(f"replayed {replayed} of the {len(set(ids))} dead letters given: "
                                   "the others do not match the filters, or were replayed meanwhile")


def _check_replayable(admin: Admin, ids: list[int]) -> None:
    """Every id given names a dead letter not replayed yet; otherwise nothing is replayed."""
    found = {row.id: row for row in run(admin.dead_letters, Filter(ids=ids), limit=len(ids))}
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
def dlq_purge(ctx: click.Context, queue: str | None, task: str | None, reason: str | None,
              older_than: float | None, newer_than: float | None, replayed: bool, purge_all: bool) -> None:
    if older_than is None and not replayed and not purge_all:
        raise click.UsageError("give --older-than DURATION, --replayed, or --all")
    deleted = run(target(ctx).admin().purge,
                  Filter(queue, task, reason, older_than, newer_than, replayed=True if replayed else None))
    click.echo(f"purged {deleted} dead letter(s)")
