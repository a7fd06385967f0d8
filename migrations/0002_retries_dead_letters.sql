-- Bounded retries and the dead-letter table.

-- Error history: one JSON object per failed attempt: at, worker, type, message, traceback.
ALTER TABLE {schema}.messages ADD COLUMN IF NOT EXISTS errors jsonb NOT NULL DEFAULT '[]';
-- Per-message cap on deliveries (from the task's max_attempts); NULL = the queue's or global.
ALTER TABLE {schema}.messages ADD COLUMN IF NOT EXISTS max_attempts integer;
-- Celery's task id and name (headers), so dead letters and stats can name them.
ALTER TABLE {schema}.messages ADD COLUMN IF NOT EXISTS task_id text;
ALTER TABLE {schema}.messages ADD COLUMN IF NOT EXISTS task_name text;

-- Set when a delivery was given back unprocessed (its delivery then does not count as an
-- attempt), so that the next delivery is still flagged as a redelivery.
ALTER TABLE {schema}.messages ADD COLUMN IF NOT EXISTS released boolean NOT NULL DEFAULT false;

-- The reaper looks only at leased rows, which are few: a partial index keeps that cheap
-- however deep the queues are.
CREATE INDEX IF NOT EXISTS messages_leased_idx
    ON {schema}.messages (visible_at) WHERE lease_token IS NOT NULL;

-- Per-queue retry policy, written by the consumers that declare the queue.
ALTER TABLE {schema}.queues ADD COLUMN IF NOT EXISTS max_attempts integer;
ALTER TABLE {schema}.queues ADD COLUMN IF NOT EXISTS backoff_base double precision;
ALTER TABLE {schema}.queues ADD COLUMN IF NOT EXISTS backoff_cap double precision;

CREATE TABLE IF NOT EXISTS {schema}.dead_letters (
    id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id       bigint      NOT NULL,
    queue            text        NOT NULL,
    priority         smallint    NOT NULL DEFAULT 0,
    task_id          text,
    task_name        text,
    -- max_attempts, lease_expired, rejected, max_retries, unregistered, undecodable
    reason           text        NOT NULL,
    attempts         integer     NOT NULL,
    max_attempts     integer,
    errors           jsonb       NOT NULL DEFAULT '[]',
    -- The original Kombu message: body, headers and properties, as published.
    payload          text        NOT NULL,
    enqueued_at      timestamptz NOT NULL,
    dead_lettered_at timestamptz NOT NULL DEFAULT now(),
    -- Set when replayed; the row stays as history until purged.
    replayed_at      timestamptz
);
CREATE INDEX IF NOT EXISTS dead_letters_queue_idx ON {schema}.dead_letters (queue, id);
CREATE INDEX IF NOT EXISTS dead_letters_task_idx ON {schema}.dead_letters (task_name, id);
CREATE INDEX IF NOT EXISTS dead_letters_time_idx ON {schema}.dead_letters (dead_lettered_at);
