-- The tables of the PostgreSQL beat scheduler (migration 0004_beat), for the scheduler
-- (celery_ext/beat.py) and the `kombu-pg beat` commands, one per `-- name:` block (format:
-- kombu_pg/queries.py). Statements that change the schedule run in one transaction with
-- beat_bump_revision, which running schedulers poll to reload. Leadership times are
-- clock_timestamp(): a leader's transaction may be long, its lease must not look longer.

-- name: beat_session_setup
-- The scheduler's own session: nothing may outlast the lease (`limit`, e.g. '15000ms'): a
-- statement, a lock wait, a transaction left open by a leader that hangs (which would hold an
-- entry's row lock against its successor).
SELECT set_config('statement_timeout', %(limit)s, false), set_config('lock_timeout', %(limit)s, false),
       set_config('idle_in_transaction_session_timeout', %(limit)s, false)

-- name: fragment_beat_entry_columns
name, task, source, every, crontab, from_config, schedule_text, args::text, kwargs::text,
options::text, paused, resumed_at, last_run_at, next_run_at, total_run_count, created_at, updated_at

-- name: beat_tables_exist
-- Read only: whether migration 0004 created the tables in this schema.
SELECT to_regclass(format('%%I.beat_entries', %(schema)s::text)) IS NOT NULL

-- name: beat_entries
SELECT {beat_entry_columns} FROM {schema}.beat_entries ORDER BY name

-- name: beat_bump_revision
UPDATE {schema}.beat_revision SET revision = revision + 1

-- name: beat_insert_entry
INSERT INTO {schema}.beat_entries (name, task, source, every, crontab, from_config, schedule_text,
                                   args, kwargs, options)
VALUES (%(name)s, %(task)s, %(source)s, %(every)s, %(crontab)s, %(from_config)s,
        %(schedule_text)s, %(args)s::jsonb, %(kwargs)s::jsonb, %(options)s::jsonb)
ON CONFLICT (name) DO NOTHING

-- name: beat_replace_entry
-- Definition only: the run state (last_run_at, paused, counts) is kept.
UPDATE {schema}.beat_entries
SET task = %(task)s, every = %(every)s, crontab = %(crontab)s, from_config = %(from_config)s,
    schedule_text = %(schedule_text)s, args = %(args)s::jsonb, kwargs = %(kwargs)s::jsonb,
    options = %(options)s::jsonb, updated_at = now()
WHERE name = %(name)s

-- name: beat_sync_lock
-- Serializes schedulers syncing beat_schedule into the table (the second key is the schema's).
SELECT pg_advisory_xact_lock(%(namespace)s::int, hashtext(%(schema)s::text))

-- name: beat_upsert_config_entry
-- An entry of beat_schedule: added, or its definition updated when it changed (run state kept;
-- an entry the CLI added under the same name becomes the configuration's). No row when
-- nothing changed; `inserted` tells an addition from an update.
INSERT INTO {schema}.beat_entries AS e (name, task, source, every, crontab, from_config,
                                        schedule_text, args, kwargs, options)
VALUES (%(name)s, %(task)s, 'config', %(every)s, %(crontab)s, %(from_config)s,
        %(schedule_text)s, %(args)s::jsonb, %(kwargs)s::jsonb, %(options)s::jsonb)
ON CONFLICT (name) DO UPDATE
SET task = EXCLUDED.task, source = 'config', every = EXCLUDED.every, crontab = EXCLUDED.crontab,
    from_config = EXCLUDED.from_config, schedule_text = EXCLUDED.schedule_text, args = EXCLUDED.args,
    kwargs = EXCLUDED.kwargs, options = EXCLUDED.options, updated_at = now()
WHERE (e.task, e.source, e.every, e.crontab, e.from_config, e.schedule_text, e.args, e.kwargs, e.options)
      IS DISTINCT FROM (EXCLUDED.task, EXCLUDED.source, EXCLUDED.every, EXCLUDED.crontab,
                        EXCLUDED.from_config, EXCLUDED.schedule_text, EXCLUDED.args, EXCLUDED.kwargs,
                        EXCLUDED.options)
RETURNING (xmax = 0) AS inserted

-- name: beat_delete_stale_config
-- Entries from beat_schedule that it no longer has.
DELETE FROM {schema}.beat_entries WHERE source = 'config' AND NOT (name = ANY(%(names)s::text[]))
RETURNING name

-- name: beat_set_paused
UPDATE {schema}.beat_entries
SET paused = %(paused)s, updated_at = now(),
    resumed_at = CASE WHEN paused AND NOT %(paused)s THEN now() ELSE resumed_at END
WHERE name = %(name)s
RETURNING paused

-- name: beat_delete_entry
-- Its ticks go with it (foreign key).
DELETE FROM {schema}.beat_entries WHERE name = %(name)s RETURNING source

-- name: beat_leader
-- The leader's lease, whether it ran out, whether its holder's session still exists, and the
-- schedule's revision, in one read.
SELECT l.holder, l.backend_pid, l.leader_until, l.elected_at, l.renewed_at,
       (l.leader_until IS NULL OR l.leader_until < clock_timestamp()) AS expired,
       EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = l.backend_pid) AS session_alive,
       (SELECT revision FROM {schema}.beat_revision) AS revision
FROM {schema}.beat_leader l

-- name: beat_lead
-- Take or renew the lease, under the same conditions as LeaderRow.free_for, re-checked under
-- the row lock. The leader is bound to this session: see beat_advance.
UPDATE {schema}.beat_leader l
SET holder = %(me)s, backend_pid = pg_backend_pid(),
    leader_until = clock_timestamp() + make_interval(secs => %(lease)s),
    renewed_at = clock_timestamp(),
    elected_at = CASE WHEN l.holder IS NOT DISTINCT FROM %(me)s AND l.elected_at IS NOT NULL
                      THEN l.elected_at ELSE clock_timestamp() END
WHERE l.holder IS NULL OR l.holder = %(me)s OR l.leader_until IS NULL
   OR l.leader_until < clock_timestamp()
   OR NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = l.backend_pid)
RETURNING l.leader_until

-- name: beat_resign
UPDATE {schema}.beat_leader SET leader_until = clock_timestamp() - interval '1 second'
WHERE holder = %(me)s

-- name: beat_advance
-- Compare-and-set of one entry's last tick, only for the current leader on the session it
-- holds the lease with: a scheduler that lost its session or its lease cannot advance
-- anything, and of two schedulers racing for one tick only the first succeeds.
UPDATE {schema}.beat_entries e
SET last_run_at = %(slot)s, next_run_at = %(next)s, total_run_count = e.total_run_count + %(runs)s
WHERE e.name = %(name)s AND e.last_run_at = %(expected)s AND NOT e.paused
  AND EXISTS (SELECT 1 FROM {schema}.beat_leader l
              WHERE l.holder = %(me)s AND l.backend_pid = pg_backend_pid()
                AND l.leader_until > clock_timestamp())

-- name: beat_record_tick
-- One row per tick sent: of two senders of the same tick, only the first gets a row back.
INSERT INTO {schema}.beat_ticks (entry, scheduled_at, sent_by) VALUES (%(name)s, %(slot)s, %(me)s)
ON CONFLICT DO NOTHING
RETURNING scheduled_at

-- name: beat_set_tick_task
UPDATE {schema}.beat_ticks SET task_id = %(task_id)s WHERE entry = %(name)s AND scheduled_at = %(slot)s

-- name: beat_prune_ticks
DELETE FROM {schema}.beat_ticks WHERE scheduled_at < clock_timestamp() - make_interval(secs => %(keep)s)
