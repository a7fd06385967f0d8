-- Durable revokes and task lookup (`kombu-pg revoke`, `kombu-pg task`, the Celery
-- integration), one per `-- name:` block (format: kombu_pg/queries.py; fragments:
-- fragments.sql). Values are always bound parameters.

-- name: revoke
-- Durable revoke (app.control.revoke and `celery control revoke` through the Celery integration,
-- `kombu-pg revoke`): remove the tasks' waiting messages (ready or delayed) now, and record the
-- ids for `expires_s` seconds, so that a worker that leases one of them later (one started
-- after the revoke, or restarted) drops it (see claim). Leased messages stay with their
-- consumer: Celery's broadcast revoke reaches it; they are returned so the caller can say so.
-- `unmarked`: the caller cannot mark removed tasks REVOKED in the result backend (it has no
-- Celery app): the housekeeper's worker will (revoked_to_mark).
-- Finding messages by task id scans the table (no index on task_id: one would cost every
-- publish, and building it would block the queue while the migration runs).
WITH removed AS (
    DELETE FROM {schema}.messages
    WHERE task_id = ANY(%(task_ids)s::text[]) AND {unleased}
    RETURNING id, queue, task_id, visible_at > now() AS delayed
), recorded AS (
    INSERT INTO {schema}.revoked AS r (task_id, expires_at, revoked_by, unmarked)
    SELECT t.task_id, now() + %(expires_s)s * interval '1 second', %(by)s,
           %(unmarked)s AND EXISTS (SELECT 1 FROM removed WHERE removed.task_id = t.task_id)
    FROM (SELECT DISTINCT unnest(%(task_ids)s::text[])) AS t(task_id)
    ON CONFLICT (task_id) DO UPDATE
        SET revoked_at = now(), expires_at = greatest(r.expires_at, excluded.expires_at),
            revoked_by = excluded.revoked_by, unmarked = r.unmarked OR excluded.unmarked
)
-- (A data-modifying CTE runs whether or not the query reads it.)
SELECT task_id, CASE WHEN delayed THEN 'delayed' ELSE 'ready' END, queue, id, NULL, NULL FROM removed
UNION ALL
SELECT task_id, 'leased', queue, id, leased_by, leased_at
FROM {schema}.messages
WHERE task_id = ANY(%(task_ids)s::text[]) AND NOT {unleased}

-- name: task_messages
-- `kombu-pg task`: the task's messages (one per queue it went to), as the claim sees them. The
-- delivery cap is the one the claim and the reaper apply (fragment_attempt_cap).
-- A table scan, as in revoke.
SELECT m.id, m.queue, m.task_name, m.priority,
       CASE WHEN NOT {unleased} THEN 'leased' WHEN m.visible_at > now() THEN 'delayed' ELSE 'ready' END,
       m.created_at, m.visible_at, m.leased_by, m.leased_at,
       CASE WHEN NOT {unleased} THEN coalesce(m.leased_until, m.visible_at) END,
       m.delivery_count, {attempt_cap}, m.errors, m.expires_at
FROM {schema}.messages m
WHERE m.task_id = %(task_id)s
ORDER BY m.id

-- name: task_dead_letters
SELECT id, message_id, queue, task_id, task_name, reason, attempts, max_attempts,
       dead_lettered_at, replayed_at, errors -> -1 ->> 'type', errors -> -1 ->> 'message'
FROM {schema}.dead_letters
WHERE task_id = %(task_id)s
ORDER BY id

-- name: task_revoked
SELECT revoked_at, expires_at, revoked_by FROM {schema}.revoked
WHERE task_id = %(task_id)s AND expires_at > now()
