-- The PostgreSQL beat scheduler (celery beat -S kombu_pg, celery_ext/beat.py) and the
-- `kombu-pg beat` commands: the schedule, its run state, leader election and one row per
-- enqueued tick. Idempotent, as every migration.

CREATE TABLE IF NOT EXISTS {schema}.beat_entries (
    name            text             PRIMARY KEY,
    task            text             NOT NULL,
    -- 'config': synced from the app's beat_schedule when beat starts, and deleted once it is
    -- no longer there; 'cli': added at run time (kombu-pg beat add), kept until removed.
    source          text             NOT NULL DEFAULT 'cli' CHECK (source IN ('config', 'cli')),
    -- The schedule: every this many seconds, or a crontab line
    -- 'minute hour day-of-month month day-of-week'.
    every           double precision CHECK (every > 0),
    crontab         text,
    -- True when the schedule, arguments or options cannot be stored here (a solar or custom
    -- schedule, arguments that are not JSON): each scheduler takes the definition from its
    -- own beat_schedule. Nothing stored here is ever unpickled.
    from_config     boolean          NOT NULL DEFAULT false,
    -- Human readable schedule, for listings.
    schedule_text   text             NOT NULL,
    -- JSON as Kombu encodes it (datetimes and the like keep their type).
    args            jsonb            NOT NULL DEFAULT jsonb_build_array(),
    kwargs          jsonb            NOT NULL DEFAULT jsonb_build_object(),
    options         jsonb            NOT NULL DEFAULT jsonb_build_object(),
    paused          boolean          NOT NULL DEFAULT false,
    -- When it was last resumed: ticks scheduled while it was paused are skipped, not sent.
    resumed_at      timestamptz,
    -- The scheduled (nominal) time of the last tick, from which the next one is computed. A new
    -- entry starts at its creation time, so its first tick is one period later, as with
    -- Celery's own scheduler. Advanced only by compare-and-set in the transaction that
    -- enqueues the tick, so one tick is enqueued once whatever number of schedulers run.
    last_run_at     timestamptz      NOT NULL DEFAULT now(),
    -- Written by the leader when it advances the entry (for listings only).
    next_run_at     timestamptz,
    total_run_count bigint           NOT NULL DEFAULT 0,
    created_at      timestamptz      NOT NULL DEFAULT now(),
    updated_at      timestamptz      NOT NULL DEFAULT now(),
    CONSTRAINT beat_entries_schedule_check CHECK (from_config OR num_nonnulls(every, crontab) = 1)
);

-- One row: incremented in the same transaction as every change of the entries' definitions or
-- paused state, so running schedulers notice a change by reading one number.
CREATE TABLE IF NOT EXISTS {schema}.beat_revision (
    id       boolean PRIMARY KEY DEFAULT true CHECK (id),
    revision bigint  NOT NULL DEFAULT 0
);
INSERT INTO {schema}.beat_revision (id) VALUES (true) ON CONFLICT DO NOTHING;

-- Leader election, one row. The leader renews leader_until every second or so; another
-- scheduler takes over once the lease has run out, or at once when the leader's database
-- session (backend_pid) has ended, which is what happens when the leader process dies.
CREATE TABLE IF NOT EXISTS {schema}.beat_leader (
    id           boolean     PRIMARY KEY DEFAULT true CHECK (id),
    holder       text,
    backend_pid  integer,
    leader_until timestamptz,
    elected_at   timestamptz,
    renewed_at   timestamptz
);
INSERT INTO {schema}.beat_leader (id) VALUES (true) ON CONFLICT DO NOTHING;

-- One row per enqueued tick, inserted in the transaction that enqueues its message: the key
-- (entry, scheduled time) can be enqueued once only. Old rows are pruned by the leader.
CREATE TABLE IF NOT EXISTS {schema}.beat_ticks (
    entry        text        NOT NULL REFERENCES {schema}.beat_entries (name)
                             ON DELETE CASCADE ON UPDATE CASCADE,
    scheduled_at timestamptz NOT NULL,
    task_id      text,
    sent_by      text        NOT NULL,
    sent_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (entry, scheduled_at)
);
CREATE INDEX IF NOT EXISTS beat_ticks_scheduled_at_idx ON {schema}.beat_ticks (scheduled_at);
