-- Operator statements (`kombu-pg dlq`, `kombu-pg stats`, kombu_pg/admin.py): dead letters
-- and queue statistics, one per `-- name:` block (format: kombu_pg/queries.py; fragments:
-- fragments.sql). Values are always bound parameters.

-- name: dlq_list
-- Keyset pagination on id: stable and cheap however many dead letters there are.
SELECT id, message_id, queue, task_id, task_name, reason, attempts, max_attempts,
       dead_lettered_at, replayed_at, errors -> -1 ->> 'type', errors -> -1 ->> 'message'
FROM {schema}.dead_letters
WHERE id > %(after)s
  AND {dead_letter_filter}
ORDER BY id
LIMIT %(limit)s

-- name: dlq_get
SELECT id, message_id, queue, priority, task_id, task_name, reason, attempts, max_attempts,
       errors, payload, enqueued_at, dead_lettered_at, replayed_at
FROM {schema}.dead_letters
WHERE id = %(id)s

-- name: dlq_count
SELECT count(*)
FROM {schema}.dead_letters
WHERE {dead_letter_filter}

-- name: dlq_replay_batch
-- Put a batch of dead letters back on their queues as new messages: attempts start again, the
-- error history comes along, and the dead letter stays (marked replayed) until purged. Run in
-- one transaction for a whole replay, so that it applies entirely or not at all. The wake-up
-- has the publishes' payload (fragment_wake): consumers start the messages at once, not at
-- their next safety-net poll.
WITH picked AS (
    SELECT id
    FROM {schema}.dead_letters
    WHERE replayed_at IS NULL
      AND id > %(after)s
      AND {dead_letter_filter}
    ORDER BY id
    LIMIT %(limit)s
    FOR UPDATE
), marked AS (
    UPDATE {schema}.dead_letters d
    SET replayed_at = now()
    FROM picked p
    WHERE d.id = p.id
    RETURNING d.*
), requeued AS (
    INSERT INTO {schema}.messages (queue, priority, payload, task_id, task_name, max_attempts, errors)
    SELECT queue, priority, payload, task_id, task_name, max_attempts, errors
    FROM marked
    ORDER BY id
    RETURNING queue, visible_at
)
SELECT (SELECT count(*) FROM requeued),
       (SELECT max(id) FROM marked),
       (SELECT count({wake})
        FROM (SELECT queue, min(visible_at) AS visible_at FROM requeued GROUP BY queue) AS q)

-- name: dlq_purge
DELETE FROM {schema}.dead_letters
WHERE {dead_letter_filter}

-- name: stats_queues
-- Ready: deliverable now. Delayed: waiting for an ETA or a retry backoff. Leased: held by a
-- consumer. Oldest ready age: how long the longest-waiting ready message has been deliverable.
SELECT coalesce(q.name, m.queue) AS queue,
       count(m.id) FILTER (WHERE m.visible_at <= now() AND {unleased}) AS ready,
       count(m.id) FILTER (WHERE m.visible_at > now() AND m.lease_token IS NULL) AS delayed,
       count(m.id) FILTER (WHERE NOT {unleased}) AS leased,
       extract(epoch FROM now() - min(m.visible_at) FILTER (WHERE m.visible_at <= now() AND {unleased}))
           AS oldest_ready_age_s
FROM {schema}.messages m
FULL JOIN {schema}.queues q ON q.name = m.queue
GROUP BY 1
ORDER BY 1

-- name: stats_dead_letters
SELECT queue, reason, count(*)
FROM {schema}.dead_letters
WHERE replayed_at IS NULL
GROUP BY 1, 2
ORDER BY 1, 2
