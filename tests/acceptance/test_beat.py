"""The PostgreSQL beat scheduler (celery beat -S kombu_pg) and `kombu-pg beat`."""
from __future__ import annotations

import datetime as dt
import json
import os
import signal
import time
from time import monotonic

import psycopg
import pytest
from psycopg import sql

from conftest import console_script, wait_for

#: Documented failover when the leader process dies: a standby notices at its next check
#: (kombu_pg_beat_refresh, 1 s). Bound used by the tests, with slack for a loaded machine.
FAILOVER_BOUND = 3.0
ONE_SECOND = dt.timedelta(seconds=1)


# -- helpers -------------------------------------------------------------------------------------

def beat_conf(entries: dict, **settings):
    """conf for make_app: beat_schedule entries {name: (task, seconds, args)}."""
    def conf(name):
        schedule = {entry: {"task": f"{name}.{task}", "schedule": seconds, "args": args}
                    for entry, (task, seconds, args) in entries.items()}
        return {"beat_schedule": schedule, **settings}
    return conf


def start_beat(procs, app, name: str):
    return procs.spawn([console_script("celery"), "-A", app.name, "beat", "-S", "kombu_pg", "-l", "INFO"],
                       name=name)


def wait_log(proc, text: str, timeout: float = 20.0):
    def found():
        if text in proc.log():
            return True
        assert proc.alive(), f"{proc.name} exited ({proc.popen.returncode}):\n{proc.log()[-3000:]}"
        return False
    wait_for(found, timeout, what=f"{text!r} in the log of {proc.name}")


def pg_beat(procs, env, *args: str, check: bool = True):
    result = procs.run([console_script("kombu-pg"), "--url", env.url, "--schema", env.broker_schema,
                        "beat", *args])
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def ticks(env, entry: str | None = None) -> list[dict]:
    if not env.db.table_exists(env.broker_schema, "beat_ticks"):
        return []
    cur = env.db.conn.cursor(row_factory=psycopg.rows.dict_row)
    return cur.execute(sql.SQL("SELECT * FROM {} WHERE %(e)s::text IS NULL OR entry = %(e)s"
                               " ORDER BY scheduled_at").format(env.t("beat_ticks")), {"e": entry}).fetchall()


def leader(env) -> dict:
    cur = env.db.conn.cursor(row_factory=psycopg.rows.dict_row)
    return cur.execute(sql.SQL("SELECT *, clock_timestamp() AS now FROM {}").format(env.t("beat_leader"))).fetchone()


def holder_pid(holder: str) -> int:
    return int(holder.split(":")[-2])  # host:pid:random


def entries(procs, env) -> dict:
    out = pg_beat(procs, env, "list", "--json").stdout
    return {e["name"]: e for e in json.loads(out)["entries"]}


def gaps(rows) -> list[float]:
    return [(b["scheduled_at"] - a["scheduled_at"]).total_seconds() for a, b in zip(rows, rows[1:])]


def stable_count(env, entry: str, settle: float, hold: float) -> int:
    """Wait ``settle`` s (a tick in flight lands), then check no tick comes for ``hold`` s."""
    time.sleep(settle)
    count = len(ticks(env, entry))
    time.sleep(hold)
    assert len(ticks(env, entry)) == count, f"{entry} still fired: {ticks(env, entry)[count:]}"
    return count


# -- acceptance: two schedulers, exactly once, failover ------------------------------------------------

@pytest.mark.slow
def test_two_beats_send_every_tick_once_and_fail_over_on_kill9(make_app, procs, env):
    app = make_app(conf=beat_conf({"hb": ("mark", 1.0, ("hb",))}, kombu_pg_beat_lease=10))
    procs.worker(app, pool="prefork", concurrency=2)
    first = start_beat(procs, app, "beat-a")
    wait_log(first, "is now the leader")
    [line] = [line for line in first.log().splitlines() if "is now the leader" in line]
    assert ": INFO/" in line, line  # routine news, not a warning
    second = start_beat(procs, app, "beat-b")
    wait_log(second, "standby:")

    time.sleep(14)  # both run: the leader sends, the standby waits
    holder = leader(env)["holder"]
    old, new = (first, second) if holder_pid(holder) == first.pid else (second, first)
    assert holder_pid(holder) == old.pid
    killed_at = env.db.scalar("SELECT clock_timestamp()")
    old.kill9()

    wait_log(new, "is now the leader", timeout=FAILOVER_BOUND + 5)
    state = leader(env)
    new_holder = state["holder"]
    assert holder_pid(new_holder) == new.pid
    takeover = (state["elected_at"] - killed_at).total_seconds()
    wait_for(lambda: any(t["sent_by"] == new_holder for t in ticks(env, "hb")), 10, what="a tick from the new leader")
    first_new = next(t for t in ticks(env, "hb") if t["sent_by"] == new_holder)
    time.sleep(12)
    new.terminate()
    new.wait_exit(15)

    rows = ticks(env, "hb")
    slots = [t["scheduled_at"] for t in rows]
    assert len(slots) == len(set(slots))
    assert {t["sent_by"] for t in rows} == {holder, new_holder}
    # The old leader's ticks, then the new one's: never both at once.
    senders = [t["sent_by"] for t in rows]
    assert senders == sorted(senders, key=lambda s: s == new_holder), senders
    # Scheduled times stay on the one-second grid of the first tick: one per second, a gap only
    # at the failover (missed ticks coalesced), no longer than the failover bound.
    spacing = gaps(rows)
    assert all(abs(g - round(g)) < 1e-6 and g >= 1 for g in spacing), spacing
    missed = [g for g in spacing if round(g) > 1]
    assert len(missed) <= 1 and all(g <= 1 + FAILOVER_BOUND for g in missed), spacing
    before = [t for t in rows if t["sent_by"] == holder]
    after = [t for t in rows if t["sent_by"] == new_holder]
    assert len(before) >= 14 and len(after) >= 11, (len(before), len(after))
    # Each tick ran exactly once on the worker; nothing else ran.
    task_ids = [t["task_id"] for t in rows]
    assert None not in task_ids
    runs = env.wait_runs(len(rows), "hb", timeout=30)
    time.sleep(1)
    runs = env.runs("hb")
    assert sorted(r["task_id"] for r in runs) == sorted(task_ids)
    env.wait_count("celery", 0, timeout=10)

    send_delay = (first_new["sent_at"] - killed_at).total_seconds()
    print(f"\nfailover after kill -9: leadership taken after {takeover:.2f}s, first tick from the new "
          f"leader {send_delay:.2f}s after the kill; gaps at failover: {missed or 'none'}")
    assert takeover <= FAILOVER_BOUND, takeover


@pytest.mark.slow
def test_a_hung_leader_loses_the_lease_and_sends_no_duplicate(make_app, procs, env):
    """SIGSTOP keeps the leader's session open: the standby waits for the lease to run out; the
    old leader, resumed, finds it lost the leadership and sends nothing."""
    lease = 3.0
    app = make_app(conf=beat_conf({"hb": ("mark", 1.0, ("hb",))}, kombu_pg_beat_lease=lease))
    first = start_beat(procs, app, "beat-a")
    wait_log(first, "is now the leader")
    [line] = [line for line in first.log().splitlines() if "is now the leader" in line]
    assert ": INFO/" in line, line  # routine news, not a warning
    second = start_beat(procs, app, "beat-b")
    wait_log(second, "standby:")
    time.sleep(2)
    stopped_at = monotonic()
    os.kill(first.pid, signal.SIGSTOP)
    try:
        wait_log(second, "is now the leader", timeout=lease + 5)
        took = monotonic() - stopped_at
        time.sleep(2)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    wait_log(first, "lost the leadership", timeout=10)
    time.sleep(2)
    rows = ticks(env, "hb")
    assert len({t["scheduled_at"] for t in rows}) == len(rows)
    spacing = gaps(rows)
    assert all(abs(g - round(g)) < 1e-6 and g >= 1 for g in spacing), spacing
    senders = [t["sent_by"] for t in rows]
    assert len(set(senders)) == 2 and senders == sorted(senders, key=lambda s: holder_pid(s) == second.pid)
    print(f"\nhung leader: standby took over {took:.2f}s after SIGSTOP (lease {lease:g}s)")
    assert took <= lease + FAILOVER_BOUND


# -- acceptance: pause, resume, state across restarts ---------------------------------------------------

@pytest.mark.slow
def test_pause_and_resume_from_the_cli_survive_restarts(make_app, procs, env):
    app = make_app(conf=beat_conf({"hb": ("mark", 1.0, ("hb",))}))
    beat1 = start_beat(procs, app, "beat-1")
    wait_for(lambda: len(ticks(env, "hb")) >= 2, 20, what="two ticks")

    assert "paused hb" in pg_beat(procs, env, "pause", "hb").stdout
    paused_count = stable_count(env, "hb", settle=1.5, hold=2.5)
    assert entries(procs, env)["hb"]["paused"] is True

    beat1.terminate()
    assert beat1.wait_exit(15) == 0
    assert "resigned the leadership" in beat1.log()
    beat2 = start_beat(procs, app, "beat-2")
    wait_log(beat2, "schedule loaded", timeout=20)
    assert "is now the leader" in beat2.log() and "hb (paused)" in beat2.log()
    assert stable_count(env, "hb", settle=0.5, hold=2.5) == paused_count  # still paused

    resumed_at = env.db.scalar("SELECT clock_timestamp()")
    assert "resumed hb" in pg_beat(procs, env, "resume", "hb").stdout
    wait_for(lambda: len(ticks(env, "hb")) >= paused_count + 2, 6, what="ticks after resume")
    rows = ticks(env, "hb")
    first_after = rows[paused_count]
    # Picked up within seconds; the ticks that fell while it was paused are not sent.
    resumed_in_db = dt.datetime.fromisoformat(entries(procs, env)["hb"]["resumed_at"])
    assert first_after["scheduled_at"] > resumed_in_db >= resumed_at
    assert (first_after["sent_at"] - resumed_at).total_seconds() < 3
    beat2.terminate()
    assert beat2.wait_exit(15) == 0
    # The state lived through the restart: one grid, one run count, one message per tick.
    rows = ticks(env, "hb")
    assert all(abs(g - round(g)) < 1e-6 and g >= 1 for g in gaps(rows))
    assert entries(procs, env)["hb"]["total_run_count"] == len(rows)
    assert len(env.messages("celery")) == len(rows)


@pytest.mark.slow
def test_cli_entries_at_run_time_and_config_sync_on_restart(make_app, procs, env):
    app = make_app(conf=beat_conf({"hb": ("mark", 1.0, ("hb",)), "hourly": ("mark", 3600.0, ("h",))}))
    beat1 = start_beat(procs, app, "beat-1")
    wait_log(beat1, "is now the leader")

    added = pg_beat(procs, env, "add", "extra", "--task", app.task_name("mark"), "--every", "1",
                    "--args", '["extra"]', "--queue", "extra_q")
    assert "added extra" in added.stdout
    wait_for(lambda: len(ticks(env, "extra")) >= 2, 8, what="ticks of the entry added at run time")
    assert {m["queue"] for m in env.messages("extra_q")} == {"extra_q"}
    assert pg_beat(procs, env, "add", "extra", "--task", "x", "--every", "1", check=False).returncode != 0
    assert "removed extra" in pg_beat(procs, env, "remove", "extra").stdout
    time.sleep(1.5)  # a tick in flight lands
    sent = len(env.messages("extra_q"))
    time.sleep(2.0)
    assert len(env.messages("extra_q")) == sent  # no longer fires
    assert ticks(env, "extra") == []  # its tick records went with it
    assert pg_beat(procs, env, "pause", "nope", check=False).returncode != 0

    pg_beat(procs, env, "add", "kept", "--task", app.task_name("mark"), "--crontab", "0 4 * * *")
    # The celery command mounts the same commands.
    listed = procs.celery(app, "pg", "beat", "list")
    assert listed.returncode == 0 and "kept" in listed.stdout and "crontab(0 4 * * *)" in listed.stdout
    beat1.terminate()
    assert beat1.wait_exit(15) == 0

    # Restart with another configuration: hb changed, hourly gone; the CLI entry stays.
    app2 = make_app(conf=beat_conf({"hb": ("add", 2.0, (1, 2))}))
    beat2 = start_beat(procs, app2, "beat-2")
    wait_log(beat2, "is now the leader")
    assert "updated hb" in beat2.log() and "removed hourly" in beat2.log()
    now = entries(procs, env)
    now.pop("celery.backend_cleanup", None)
    assert set(now) == {"hb", "kept"}
    assert (now["hb"]["source"], now["hb"]["every"], now["hb"]["task"], now["hb"]["args"]) == \
        ("config", 2.0, app2.task_name("add"), [1, 2])
    assert (now["kept"]["source"], now["kept"]["crontab"]) == ("cli", "0 4 * * *")


# -- in process: the guards that make a tick once only ------------------------------------------------

def test_a_scheduler_that_lost_its_lease_or_session_sends_nothing(make_app, env):
    from celery_ext.beat import Scheduler

    app = make_app(conf=beat_conf({"hb": ("mark", 1.0, ("hb",))}))
    a = Scheduler(app.app)
    b = Scheduler(app.app)
    try:
        assert a._leader and not b._leader
        time.sleep(1.05)
        a.tick()
        assert [t["sent_by"] for t in ticks(env, "hb")] == [a.identity]

        # Split brain: A's lease ran out in the database while A still believes it leads.
        env.db.query(sql.SQL("UPDATE {} SET leader_until = clock_timestamp() - interval '1 second'")
                     .format(env.t("beat_leader")))
        b._next_refresh = 0.0
        b.tick()
        assert b._leader
        time.sleep(1.05)
        a._next_refresh = monotonic() + 100  # A has not looked at the lease yet...
        a.tick()  # ...and tries to send the due tick: refused by the database
        assert [t["sent_by"] for t in ticks(env, "hb")] == [a.identity]
        b.tick()
        assert [t["sent_by"] for t in ticks(env, "hb")] == [a.identity, b.identity]
        a.tick()
        assert not a._leader  # it reloaded and found out

        # B's session dies (the leader's connection is cut): it cannot send on a new session
        # until it holds the lease again, and A takes over because B's session is gone.
        env.db.query("SELECT pg_terminate_backend(%s)", (b._conn.info.backend_pid,))
        time.sleep(1.05)
        b.tick()
        assert not b._leader and b._conn is None
        a._next_refresh = 0.0
        a.tick()
        assert a._leader
        b._next_refresh = 0.0
        b.tick()
        assert not b._leader
        rows = ticks(env, "hb")
        assert len({t["scheduled_at"] for t in rows}) == len(rows)
        assert len(env.messages("celery")) == len(rows)
    finally:
        a.close()
        b.close()


def test_stored_definitions_and_scheduled_times():
    from celery import Celery
    from celery.beat import BeatLazyFunc
    from celery.schedules import crontab, schedule

    from celery_ext.beat import Entry, Scheduler, definition_of, next_after

    app = Celery("defs", broker="memory://", set_as_current=False)
    app.conf.timezone = "Europe/Paris"
    scheduler = Scheduler(app, lazy=True)

    def entry(schedule, args=(), **kw):
        return Entry(name="e", task="t", schedule=schedule, args=args, app=app, **kw)

    every = definition_of(entry(dt.timedelta(minutes=5), args=(1, dt.datetime(2024, 1, 1))))
    assert (every.every, every.crontab, every.from_config, every.schedule_text) == (300.0, None, False, "every 300s")
    assert "datetime" in every.args  # Kombu's JSON keeps the type
    cron = definition_of(entry(crontab(minute="*/15", hour=3)))
    assert (cron.crontab, cron.from_config) == ("*/15 3 * * *", False)
    relative = definition_of(entry(schedule(60, relative=True)))  # (solar would need ephem)
    assert relative.from_config and relative.every is None
    assert definition_of(entry(10, args=(BeatLazyFunc(time.time),))).from_config

    # Times follow from the last tick alone; across the spring DST change in the app timezone.
    quarter = crontab(minute="*/15", app=app)
    t = dt.datetime(2024, 3, 31, 0, 50, tzinfo=dt.timezone.utc)  # 01:50 in Paris
    seen = []
    for _ in range(3):
        t = next_after(quarter, t)
        seen.append(t.astimezone(dt.timezone.utc).strftime("%H:%M"))
    assert seen == ["01:00", "01:15", "01:30"]  # 03:00, 03:15, 03:30 local (02:xx does not exist)

    # Missed ticks of an interval are coalesced into the latest one, on the same grid.
    last = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    now = last + dt.timedelta(seconds=7.5)
    plan = scheduler._plan(entry(2.0, last_run_at=last), now)
    assert (plan.slot, plan.next_at, plan.skipped) == (last + 3 * 2 * ONE_SECOND, last + 4 * 2 * ONE_SECOND, 2)
    assert scheduler._plan(entry(10.0, last_run_at=last), now).slot is None
    # Ticks that fell while the entry was paused are skipped (advanced past, not sent).
    plan = scheduler._plan(entry(2.0, last_run_at=last, resumed_at=last + 7 * ONE_SECOND), now)
    assert (plan.slot, plan.publish) == (last + 6 * ONE_SECOND, False)
