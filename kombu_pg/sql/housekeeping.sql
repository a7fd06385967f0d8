-- Statements of the housekeeping rounds (kombu_pg/housekeeping.py, one consumer of the
-- cluster at a time) and of the vacuum service (kombu_pg/vacuum.py), one per `-- name:` block
-- (format: kombu_pg/queries.py; fragments: fragments.sql). Values are always bound parameters.

-- name: housekeeper_renew
-- The first statement of a housekeeping round: renew the lease if it is still ours (else
-- another process took over: no round). The row stays locked until the round commits, so
-- rounds never overlap.
UPDATE {schema}.housekeeper
SET leader_until = now() + %(lease_s)s * interval '1 second', last_round_at = now()
WHERE id AND holder = %(holder)s
RETURNING leader_until

-- name: housekeeper_resign
-- A housekeeper that shuts down gives the lease up: the next consumer to poll takes it.
UPDATE {schema}.housekeeper SET leader_until = NULL WHERE id AND holder = %(holder)s

-- name: reap
-- Expired leases: the consumer died or stalled. Those with deliveries left go back to their
-- queue (they were deliverable already; clearing the token makes stats count them as ready);
-- those without go to the dead letters. Rows are picked and changed under the same lock, and
-- only while their lease is still expired, so a message acked or re-leased meanwhile is skipped.
WITH expired AS (
    SELECT m.id, m.delivery_count, {attempt_cap} AS cap
    FROM {schema}.messages m
    WHERE m.lease_token IS NOT NULL AND coalesce(m.leased_until, m.visible_at) <= now()
      -- Not the reaping process's own leases (see claim).
      AND m.id <> ALL(%(held)s::bigint[])
    ORDER BY coalesce(m.leased_until, m.visible_at)
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), note AS (
    SELECT jsonb_build_array(jsonb_build_object(
        'at', now(), 'worker', null, 'type', 'LeaseExpired',
        'message', 'the consumer holding the message stopped renewing its lease', 'traceback', null)) AS error
), dead AS (
    DELETE FROM {schema}.messages d
    USING expired e
    WHERE d.id = e.id AND e.delivery_count >= e.cap
    RETURNING d.*, e.cap, 'lease_expired' AS reason, (SELECT error FROM note) AS error
), buried AS (
    {dead_letter_insert}
    RETURNING message_id, queue, task_id, attempts
), returned AS (
    UPDATE {schema}.messages r
    SET lease_token = NULL, leased_until = NULL, errors = r.errors || (SELECT error FROM note)
    FROM expired e
    WHERE r.id = e.id AND e.delivery_count < e.cap
    RETURNING r.id, r.queue, r.task_id, r.delivery_count
)
SELECT 'dead_lettered', message_id, queue, task_id, attempts FROM buried
UNION ALL
SELECT 'returned', id, queue, task_id, delivery_count FROM returned

-- name: wake_queues
-- Wake the consumers of queues whose messages became deliverable without a NOTIFY of their
-- own: expired leases the reaper returned. Delivered when the round commits.
SELECT {wake}
FROM unnest(%(queues)s::text[]) AS q(queue), now() AS visible_at

-- name: sweep_expired_queues
-- x-expires: unused queues, with their bindings and messages. While a queue is consumed its
-- last_used is ahead of now() (see poll). Auto-delete queues declared
-- without x-expires get `auto_delete_expires`, so that those of killed consumers go too.
WITH gone AS (
    DELETE FROM {schema}.queues
    WHERE last_used + coalesce(expires, CASE WHEN auto_delete
                                             THEN %(auto_delete_expires_s)s * interval '1 second'
                                        END) < now()
    RETURNING name
), b AS (
    DELETE FROM {schema}.bindings WHERE queue IN (SELECT name FROM gone)
)
DELETE FROM {schema}.messages WHERE queue IN (SELECT name FROM gone)

-- name: sweep_revoked
-- Revoked ids kept past their expiry go (Celery forgets them after worker_revoke_expires too).
DELETE FROM {schema}.revoked WHERE expires_at <= now()

-- name: revoked_to_mark
-- Tasks whose waiting message a revoke removed, without marking them REVOKED in the result
-- backend (see revoke): the housekeeper's worker does, once.
UPDATE {schema}.revoked r
SET unmarked = false
FROM (SELECT task_id FROM {schema}.revoked WHERE unmarked LIMIT %(limit)s FOR UPDATE SKIP LOCKED) AS u
WHERE r.task_id = u.task_id
RETURNING r.task_id

-- name: sweep_expired_messages
-- Plain messages past their TTL are dropped, as Kombu's TTL means. Celery tasks are not (see
-- claim and sweep_expired_tasks).
DELETE FROM {schema}.messages WHERE expires_at <= now() AND task_id IS NULL

-- name: sweep_expired_tasks
-- A Celery task past its TTL is delivered by claims, and the worker marks it REVOKED. One that
-- no consumer takes within `grace_s` seconds of expiring (and of becoming visible: an ETA
-- later than its expiry, a retry backoff, a lease) waits in a queue nobody consumes: rather
-- than stay there forever unnoticed, it goes to the dead letters with reason 'expired'; the
-- caller marks the returned task ids REVOKED. Rows held by a claim right now are skipped.
WITH stale AS (
    SELECT id
    FROM {schema}.messages
    WHERE task_id IS NOT NULL
      AND expires_at <= now() - %(grace_s)s * interval '1 second'
      AND visible_at <= now() - %(grace_s)s * interval '1 second'
      -- Not while a consumer holds it (a task that expired while it runs is acked as usual).
      AND (lease_token IS NULL OR coalesce(leased_until, visible_at) <= now() - %(grace_s)s * interval '1 second')
    ORDER BY expires_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), dead AS (
    DELETE FROM {schema}.messages d
    USING stale s
    WHERE d.id = s.id
    RETURNING d.*, d.max_attempts AS cap, 'expired' AS reason,
              jsonb_build_array(jsonb_build_object(
                  'at', now(), 'worker', null, 'type', 'Expired', 'traceback', null,
                  'message', 'the task expired and no consumer took it within '
                             || %(grace_s)s || ' s: it was never run')) AS error
)
{dead_letter_insert}
RETURNING message_id, queue, task_id

-- name: vacuum_due
-- For the vacuum service (kombu_pg/vacuum.py): whether this role may vacuum the messages table
-- (it owns it, directly or through a role; superusers may), and how many dead and live rows
-- the statistics count (they lag by about a second, which is fine for a threshold).
SELECT pg_has_role(current_user, c.relowner, 'USAGE'), s.n_dead_tup, s.n_live_tup
FROM pg_class c
LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
WHERE c.relname = 'messages'
  AND c.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = %(schema)s)

-- name: vacuum_messages
-- SKIP_LOCKED: if another vacuum (autovacuum, another process) works on it, skip this round.
-- TRUNCATE false: giving empty pages at the end back to the OS takes an exclusive lock that
-- would stall claims; the space is reused instead.
VACUUM (SKIP_LOCKED, TRUNCATE false) {schema}.messages
