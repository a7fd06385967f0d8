-- Fragments: pieces of SQL spliced into the statements of the other files where these say
-- `{name}` (the block name without `fragment_`). Kept here so that every statement computes a
-- rule the same way: what a live lease is, the delivery cap, the wake-up, the dead-letter row.

-- name: fragment_lease_commit
-- A CTE for the statements that take or extend a lease (claim, renew): `synchronous_commit` is
-- 'on' by default (option durable_leases), so a lease survives a server crash or a failover to
-- a synchronous standby. Lost, a lease would make a running task's message deliverable again,
-- and it would run twice. With 'off' the commit does not wait for the WAL flush (~0.3 ms here);
-- the next durable commit or the WAL writer flushes it. The statement must join `lease_commit`
-- for the setting to apply; it is local to the statement's own transaction.
lease_commit AS MATERIALIZED (SELECT set_config('synchronous_commit', %(synchronous_commit)s, true))

-- name: fragment_unleased
-- No live lease. A lease is (lease_token, leased_until); a row leased by a worker of the
-- previous layout has leased_until NULL and its lease's end in visible_at (see migration 0006).
-- Neither column is indexed, so taking and renewing leases are HOT updates.
(lease_token IS NULL OR coalesce(leased_until, visible_at) <= now())

-- name: fragment_on_duplicate_key
-- With a unique key, a message already waiting or running under that key wins: nothing is
-- inserted and no row returned (the caller logs the duplicate). In replace mode a waiting one
-- takes the new content instead; a running one still wins.
ON CONFLICT (queue, unique_key) WHERE unique_key IS NOT NULL DO UPDATE
    SET payload = excluded.payload, priority = excluded.priority, visible_at = excluded.visible_at,
        expires_at = excluded.expires_at, task_id = excluded.task_id
    WHERE %(unique_replace)s AND messages.lease_token IS NULL
    RETURNING queue, visible_at

-- name: fragment_dead_letter_filter
-- Which dead letters an operator means: every filter is optional, a NULL parameter matches all.
(%(queue)s::text IS NULL OR queue = %(queue)s)
  AND (%(task)s::text IS NULL OR task_name = %(task)s)
  AND (%(reason)s::text IS NULL OR reason = %(reason)s)
  AND (%(older_than_s)s::float8 IS NULL OR dead_lettered_at < now() - %(older_than_s)s * interval '1 second')
  AND (%(newer_than_s)s::float8 IS NULL OR dead_lettered_at >= now() - %(newer_than_s)s * interval '1 second')
  AND (%(replayed)s::boolean IS NULL OR (replayed_at IS NOT NULL) = %(replayed)s)
  AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s))

-- name: fragment_attempt_cap
-- The delivery cap of message `m`, from the most to the least specific (as the README says):
-- the task's own (messages.max_attempts, from the task's max_attempts at publish), the
-- queue's (queue_options, declared in queues.max_attempts), the transport's default
-- (`default_max_attempts`: the client's policy for the queue). A statement that knows the
-- task's current setting puts it first (see fail).
coalesce(m.max_attempts,
         (SELECT q.max_attempts FROM {schema}.queues q WHERE q.name = m.queue),
         %(default_max_attempts)s::int)

-- name: fragment_wake
-- The wake-up of a queue's consumers: NOTIFY on the channel with the payload
-- "<milliseconds until visible> <queue>" (wake_payload, migration 0005; read by
-- kombu_pg/listener.py), so that a consumer woken for a delayed message sets a timer instead
-- of waiting for its next poll. The statement provides the columns `visible_at` and `queue`.
-- Delivered at commit; identical ones are coalesced per transaction.
pg_notify(%(channel)s, {schema}.wake_payload(visible_at) || queue)

-- name: fragment_dead_letter_insert
-- Moves the rows of the CTE `dead` to the dead letters. `dead` has the message's columns (a
-- DELETE ... RETURNING of messages) and three more: `reason`, `cap` (the delivery cap that
-- applied, kept as the dead letter's max_attempts) and `error` (the entries, a JSON array,
-- appended to the message's error history).
INSERT INTO {schema}.dead_letters (message_id, queue, priority, task_id, task_name, reason,
                                   attempts, max_attempts, errors, payload, enqueued_at)
SELECT id, queue, priority, task_id, task_name, reason,
       delivery_count, cap, errors || error, payload, created_at
FROM dead
