-- Durable revokes and task lookup.
--
-- Revoked task ids, kept `expires_at` (Celery's revoke keeps them in worker memory for
-- worker_revoke_expires, 10800 s by default). A claim flags a message whose task id is here,
-- and the worker drops it as Celery drops a task it was told to revoke: so do workers started
-- after the revoke, or restarted since. The elected housekeeper deletes expired ids.
CREATE TABLE IF NOT EXISTS {schema}.revoked (
    task_id    text        PRIMARY KEY,
    revoked_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    -- Who revoked it: "<name>[<pid>]" of the process that did.
    revoked_by text,
    -- Its waiting message was removed by a caller that could not mark the task REVOKED in the
    -- result backend (`kombu-pg revoke` knows no Celery app): the housekeeper's worker does.
    unmarked   boolean     NOT NULL DEFAULT false
);
CREATE INDEX IF NOT EXISTS revoked_expires_idx ON {schema}.revoked (expires_at);
CREATE INDEX IF NOT EXISTS revoked_unmarked_idx ON {schema}.revoked (task_id) WHERE unmarked;

-- Who holds a message's lease, since when (`kombu-pg task`): written by the claim. No index
-- covers them, so claims stay HOT updates (see 0006). Nullable without a default: a catalog
-- change, instant on a table of any size, and invisible to workers of earlier versions (their
-- claims leave them as they are: a lease they take shows no holder or a previous one).
ALTER TABLE {schema}.messages ADD COLUMN IF NOT EXISTS leased_by text;
ALTER TABLE {schema}.messages ADD COLUMN IF NOT EXISTS leased_at timestamptz;
