-- Statements of the transport, one per `-- name:` block. `{schema}` is the quoted schema name;
-- values are always bound parameters. Times are compared with the server's now(), never a
-- client clock.

-- name: session_setup
-- Every connection of the transport: a statement the server cannot finish in time is cancelled
-- (the client also gives up on a server that does not answer at all: kombu_pg/deadline.py).
SELECT set_config('statement_timeout', %(statement_timeout)s, false)

-- name: server_backend_pid
-- Pooler detection (kombu_pg/pooler.py): a client of PostgreSQL itself got this process id in
-- the handshake; a client of a pooler such as PgBouncer got a key the pooler made up instead.
SELECT pg_backend_pid()

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

-- name: publish_direct
-- Publish to one queue (the default exchange). The queue's x-message-ttl, if declared, and the
-- message's own expiration both bound expires_at; least() ignores NULLs.
-- The NOTIFY wakes consumers; it is delivered at commit, and identical ones are coalesced per
-- transaction. Its payload says when the message becomes visible (see wake_payload). It costs
-- about as much as the insert, so a producer skips it right after notifying the same queue
-- (notify=false); consumers that just got messages look again shortly after anyway.
WITH ins AS (
    INSERT INTO {schema}.messages
        (queue, priority, visible_at, expires_at, payload, task_id, task_name, max_attempts, unique_key)
    SELECT %(queue)s, %(priority)s, coalesce(%(eta)s::timestamptz, now()),
           least(now() + q.message_ttl, now() + %(ttl_ms)s * interval '1 millisecond'),
           %(payload)s, %(task_id)s, %(task_name)s, %(max_attempts)s, %(unique_key)s
    FROM (VALUES (1)) AS one
    LEFT JOIN {schema}.queues q ON q.name = %(queue)s
    {on_duplicate_key}
)
SELECT queue, CASE WHEN %(notify)s THEN pg_notify(%(channel)s, {schema}.wake_payload(visible_at) || queue) END
FROM ins

-- name: publish_routed
-- Route through an exchange in the database, so that bindings made by other processes count.
-- Returns one row per queue that received the message; none means unroutable (or, with a
-- unique key, a duplicate in every queue).
-- No wake-up for a short-lived broadcast queue (auto-delete, not durable, x-message-ttl of 10 s
-- at most: Celery's gossip and event-receiver queues): its consumer claims it on a timer
-- instead (Channel.polled_interval). Every worker's heartbeat goes to every worker's gossip
-- queue; a NOTIFY would wake every LISTEN session of the database for each of them.
WITH targets AS (
    SELECT DISTINCT b.queue, q.message_ttl,
           coalesce(q.auto_delete AND NOT q.durable AND q.message_ttl <= interval '10 seconds', false) AS polled
    FROM {schema}.bindings b
    JOIN {schema}.exchanges e ON e.name = b.exchange
    LEFT JOIN {schema}.queues q ON q.name = b.queue
    WHERE b.exchange = %(exchange)s
      AND CASE e.type
              WHEN 'direct' THEN b.routing_key = %(routing_key)s
              WHEN 'topic'  THEN %(routing_key)s ~ b.pattern
              ELSE true
          END
), ins AS (
    INSERT INTO {schema}.messages
        (queue, priority, visible_at, expires_at, payload, task_id, task_name, max_attempts, unique_key)
    SELECT t.queue, %(priority)s, coalesce(%(eta)s::timestamptz, now()),
           least(now() + t.message_ttl, now() + %(ttl_ms)s * interval '1 millisecond'),
           %(payload)s, %(task_id)s, %(task_name)s, %(max_attempts)s, %(unique_key)s
    FROM targets t
    {on_duplicate_key}
)
SELECT ins.queue, CASE WHEN %(notify)s AND NOT t.polled
                       THEN pg_notify(%(channel)s, {schema}.wake_payload(ins.visible_at) || ins.queue) END
FROM ins
JOIN targets t ON t.queue = ins.queue

-- name: claim
-- Lease up to `limit` deliverable messages: ready (visible_at passed) and without a live lease.
-- SKIP LOCKED lets concurrent consumers take disjoint rows without waiting; rows whose lease
-- expired are deliverable again. The index gives ready rows in delivery order; rows leased now
-- are skipped by the filter, so a claim costs more with the number of messages being worked on,
-- not with how many went through the table. Only unindexed columns change: a HOT update.
-- Past its TTL a plain message is not delivered (Kombu's TTL), but a Celery task (a row with a
-- task id) is, with how long ago it expired: the worker then marks it REVOKED, as Celery does
-- on other brokers, instead of it vanishing with its result waited for forever.
-- The lease records its holder ("<worker>[<pid>]") and start, for `kombu-pg task`: unindexed
-- columns too. A task revoked durably (see revoke) comes flagged: the worker drops it. That
-- costs a primary-key probe of the (small) revoked table per row claimed, not per row scanned.
WITH {lease_commit}, c AS (
    SELECT id
    FROM {schema}.messages
    WHERE queue = %(queue)s
      AND visible_at <= now()
      AND {unleased}
      AND (expires_at IS NULL OR expires_at > now() OR task_id IS NOT NULL)
      -- An expired lease that used up its deliveries is the reaper's, for the dead letters.
      AND (lease_token IS NULL OR delivery_count < coalesce(max_attempts, %(max_attempts)s))
      -- Never our own: a lease of this process that expired during an outage (a frozen or
      -- restarting server) is still being worked on and is renewed once the server answers.
      AND id <> ALL(%(held)s::bigint[])
    ORDER BY priority DESC, visible_at, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE {schema}.messages m
SET lease_token = gen_random_uuid(),
    leased_until = now() + %(lease_seconds)s * interval '1 second',
    delivery_count = m.delivery_count + 1,
    leased_by = %(holder)s,
    leased_at = now()
FROM c, lease_commit
WHERE m.id = c.id
RETURNING m.id, m.lease_token, m.delivery_count, m.priority, m.payload, m.released,
          CASE WHEN m.expires_at <= now() THEN extract(epoch FROM now() - m.expires_at) END,
          EXISTS (SELECT 1 FROM {schema}.revoked r WHERE r.task_id = m.task_id AND r.expires_at > now())

-- name: ack
-- Guarded by the token: a lease that expired and went to another consumer is not ours to delete.
DELETE FROM {schema}.messages m
USING unnest(%(ids)s::bigint[], %(tokens)s::uuid[]) AS a(id, token)
WHERE m.id = a.id AND m.lease_token = a.token
RETURNING m.queue

-- name: release
-- Give back a message that was never processed (consumer shut down, connection closed): same
-- row, no copy, visible at once. Its delivery did not count as an attempt.
WITH released AS (
    UPDATE {schema}.messages m
    SET lease_token = NULL, leased_until = NULL, delivery_count = greatest(m.delivery_count - 1, 0),
        released = true
    FROM unnest(%(ids)s::bigint[], %(tokens)s::uuid[]) AS a(id, token)
    WHERE m.id = a.id AND m.lease_token = a.token
    RETURNING m.queue
)
SELECT queue, pg_notify(%(channel)s, {schema}.wake_payload(now()) || queue) FROM (SELECT DISTINCT queue FROM released) AS r

-- name: renew
-- Extend leases still held; the ids returned are the leases that are still ours.
WITH {lease_commit}
UPDATE {schema}.messages m
SET leased_until = now() + %(lease_seconds)s * interval '1 second'
FROM unnest(%(ids)s::bigint[], %(tokens)s::uuid[]) AS a(id, token), lease_commit
WHERE m.id = a.id AND m.lease_token = a.token
RETURNING m.id

-- name: size
-- Ready messages only, like AMQP's message_count (leased and delayed ones are not counted).
-- Expired tasks are ready: the claim delivers them (to be revoked).
SELECT count(*) FROM {schema}.messages
WHERE queue = %(queue)s AND visible_at <= now() AND {unleased}
  AND (expires_at IS NULL OR expires_at > now() OR task_id IS NOT NULL)

-- name: purge
-- Ready messages only: leased messages belong to a consumer, delayed (ETA) ones are not due yet.
DELETE FROM {schema}.messages WHERE queue = %(queue)s AND visible_at <= now() AND {unleased}

-- name: queue_counts
-- `kombu-pg purge`: what each named queue holds, before asking for confirmation (as
-- stats_queues; `known` tells a queue name that is nowhere from an empty queue).
SELECT q.queue,
       EXISTS (SELECT 1 FROM {schema}.queues WHERE name = q.queue)
           OR EXISTS (SELECT 1 FROM {schema}.messages WHERE queue = q.queue),
       (SELECT count(*) FROM {schema}.messages WHERE queue = q.queue AND visible_at <= now() AND {unleased}),
       (SELECT count(*) FROM {schema}.messages WHERE queue = q.queue AND visible_at > now() AND lease_token IS NULL),
       (SELECT count(*) FROM {schema}.messages WHERE queue = q.queue AND NOT {unleased})
FROM unnest(%(queues)s::text[]) AS q(queue)

-- name: purge_queues
-- `kombu-pg purge`: ready messages (what `celery purge` removes), and on request delayed ones
-- (ETA, countdown, retry backoff) and leased ones (their consumer still runs them; its ack
-- then finds nothing). One statement: the counts per queue are what was deleted.
WITH gone AS (
    DELETE FROM {schema}.messages
    WHERE queue = ANY(%(queues)s::text[])
      AND ((visible_at <= now() AND {unleased})
           OR (%(delayed)s AND visible_at > now() AND lease_token IS NULL)
           OR (%(leased)s AND NOT {unleased}))
    RETURNING queue, visible_at > now() AND lease_token IS NULL AS delayed, NOT {unleased} AS leased
)
SELECT queue, count(*) FILTER (WHERE NOT delayed AND NOT leased), count(*) FILTER (WHERE delayed),
       count(*) FILTER (WHERE leased)
FROM gone
GROUP BY queue

-- name: declare_queue
INSERT INTO {schema}.queues (name, durable, auto_delete, expires, message_ttl,
                            max_attempts, backoff_base, backoff_cap)
VALUES (%(queue)s, %(durable)s, %(auto_delete)s,
        %(expires_ms)s * interval '1 millisecond', %(message_ttl_ms)s * interval '1 millisecond',
        %(max_attempts)s, %(backoff_base)s, %(backoff_cap)s)
ON CONFLICT (name) DO UPDATE
SET durable = excluded.durable, auto_delete = excluded.auto_delete,
    expires = excluded.expires, message_ttl = excluded.message_ttl,
    -- Never back: while consumed, last_used is ahead of now() (see poll).
    last_used = greatest(queues.last_used, now()),
    -- A declaring process without overrides keeps those another process configured.
    max_attempts = coalesce(excluded.max_attempts, queues.max_attempts),
    backoff_base = coalesce(excluded.backoff_base, queues.backoff_base),
    backoff_cap = coalesce(excluded.backoff_cap, queues.backoff_cap)

-- name: has_queue
SELECT EXISTS (SELECT 1 FROM {schema}.queues WHERE name = %(queue)s)

-- name: delete_queue
-- One statement so a concurrent publish cannot land between removing the bindings and the rows.
WITH q AS (
    DELETE FROM {schema}.queues WHERE name = %(queue)s
), b AS (
    DELETE FROM {schema}.bindings WHERE queue = %(queue)s
)
DELETE FROM {schema}.messages WHERE queue = %(queue)s

-- name: poll
-- A consumer's safety-net poll: one statement for all the queues it consumes, rare when idle
-- (see Transport._poll). Per queue: whether a message is deliverable now, as the claim sees it
-- and in the claim's order, so that the claim index serves it (expired leases count: the claim
-- skips those at their delivery cap, for the reaper).
-- Two more duties, so that an idle consumer costs one transaction per poll:
-- `touched` keeps the queues alive (x-expires): last_used is set `hold_s` ahead, past the
-- consumer's next poll, and written again only when less than `refresh_s` remains, so a busy
-- consumer polling every second does not rewrite the row every time. A queue therefore expires
-- x-expires after its last consumer stopped, plus what remained of that hold.
-- `elected` takes the housekeeper's lease when nobody holds it (ran out, or given up): SKIP
-- LOCKED, so a poll never waits for the holder's round in progress.
WITH touched AS (
    UPDATE {schema}.queues
    SET last_used = now() + %(hold_s)s * interval '1 second'
    WHERE name = ANY(%(queues)s::text[]) AND last_used < now() + %(refresh_s)s * interval '1 second'
), elected AS (
    UPDATE {schema}.housekeeper h
    SET holder = %(holder)s, leader_until = now() + %(lease_s)s * interval '1 second', elected_at = now()
    FROM (SELECT id FROM {schema}.housekeeper
          WHERE leader_until IS NULL OR leader_until <= now()
          FOR UPDATE SKIP LOCKED) AS vacant
    WHERE h.id = vacant.id
    RETURNING h.holder
)
SELECT q.queue,
       coalesce((SELECT true FROM {schema}.messages
                 WHERE queue = q.queue AND visible_at <= now() AND {unleased}
                   AND (expires_at IS NULL OR expires_at > now() OR task_id IS NOT NULL)
                 ORDER BY priority DESC, visible_at, id
                 LIMIT 1), false),
       EXISTS (SELECT 1 FROM elected)
FROM unnest(%(queues)s::text[]) AS q(queue)

-- name: next_due
-- Per queue, the seconds until its earliest delayed message (an ETA, a retry backoff) becomes
-- visible. A consumer asks when it starts listening or consuming a queue, and after a LISTEN
-- reconnect: the NOTIFY that said when was sent while it did not listen. (Otherwise the
-- NOTIFYs say it: this walks every delayed message of the queue, so it is not run per poll.)
SELECT q.queue,
       (SELECT extract(epoch FROM min(visible_at) - now())::float8 FROM {schema}.messages
        WHERE queue = q.queue AND visible_at > now())
FROM unnest(%(queues)s::text[]) AS q(queue)

-- name: declare_exchange
INSERT INTO {schema}.exchanges (name, type, durable, auto_delete)
VALUES (%(exchange)s, %(type)s, %(durable)s, %(auto_delete)s)
ON CONFLICT (name) DO NOTHING

-- name: exchange_type
SELECT type FROM {schema}.exchanges WHERE name = %(exchange)s

-- name: delete_exchange
WITH b AS (DELETE FROM {schema}.bindings WHERE exchange = %(exchange)s)
DELETE FROM {schema}.exchanges WHERE name = %(exchange)s

-- name: bind
-- A new binding tells listening processes that publishes may be stored now where they matched
-- no queue before: they stop skipping those (Database.unroutable). The payload "bind" does not
-- start with a number, so it is no queue's wake-up.
WITH bound AS (
    INSERT INTO {schema}.bindings (exchange, routing_key, pattern, queue)
    VALUES (%(exchange)s, %(routing_key)s, %(pattern)s, %(queue)s)
    ON CONFLICT DO NOTHING
    RETURNING exchange
)
SELECT pg_notify(%(channel)s, 'bind') FROM bound LIMIT 1

-- name: unbind
DELETE FROM {schema}.bindings
WHERE exchange = %(exchange)s AND routing_key = %(routing_key)s AND queue = %(queue)s

-- name: bindings_of_exchange
SELECT routing_key, pattern, queue FROM {schema}.bindings WHERE exchange = %(exchange)s

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

-- name: wake_queues
-- Wake the consumers of queues whose messages became deliverable without a NOTIFY of their
-- own: expired leases the reaper returned. Delivered when the round commits.
SELECT pg_notify(%(channel)s, {schema}.wake_payload(now()) || queue)
FROM unnest(%(queues)s::text[]) AS q(queue)

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
    RETURNING d.*
)
INSERT INTO {schema}.dead_letters (message_id, queue, priority, task_id, task_name, reason,
                                   attempts, max_attempts, errors, payload, enqueued_at)
SELECT id, queue, priority, task_id, task_name, 'expired', delivery_count, max_attempts,
       errors || jsonb_build_array(jsonb_build_object(
           'at', now(), 'worker', null, 'type', 'Expired', 'traceback', null,
           'message', 'the task expired and no consumer took it within '
                      || %(grace_s)s || ' s: it was never run')),
       payload, created_at
FROM dead
RETURNING message_id, queue, task_id

-- name: claim_no_ack
-- For consumers that do not acknowledge (remote-control and event receivers): taking the message
-- is deleting it, as with AMQP's no_ack.
WITH c AS (
    SELECT id
    FROM {schema}.messages
    WHERE queue = %(queue)s
      AND visible_at <= now()
      AND {unleased}
      AND (expires_at IS NULL OR expires_at > now())
    ORDER BY priority DESC, visible_at, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
DELETE FROM {schema}.messages m
USING c
WHERE m.id = c.id
RETURNING m.id, NULL::uuid, m.delivery_count + 1, m.priority, m.payload, m.released, NULL::numeric,
          false

-- name: fail
-- A processing attempt failed (the task raised, its worker was lost): decided here from
-- the persisted delivery count, in one statement. Below the cap the message is retried after an
-- exponential backoff with jitter (half to all of min(cap, base * 2^(attempt-1)) seconds); at the
-- cap it moves to the dead letters. Either way the attempt's error joins the history. A message
-- whose lease is no longer ours (acked, or re-leased elsewhere) is left alone: no row returned.
WITH m AS (
    SELECT m.id, m.delivery_count,
           coalesce(%(max_attempts)s, m.max_attempts, q.max_attempts, %(default_max_attempts)s) AS cap,
           coalesce(%(backoff_base)s, q.backoff_base, %(default_backoff_base)s) AS base,
           coalesce(%(backoff_cap)s, q.backoff_cap, %(default_backoff_cap)s) AS backoff_cap
    FROM {schema}.messages m
    LEFT JOIN {schema}.queues q ON q.name = m.queue
    WHERE m.id = %(id)s AND m.lease_token = %(token)s
    FOR UPDATE OF m
), dead AS (
    DELETE FROM {schema}.messages d
    USING m
    WHERE d.id = m.id AND m.delivery_count >= m.cap
    RETURNING d.*, m.cap
), buried AS (
    INSERT INTO {schema}.dead_letters (message_id, queue, priority, task_id, task_name, reason,
                                       attempts, max_attempts, errors, payload, enqueued_at)
    SELECT id, queue, priority, task_id, task_name, %(dead_reason)s,
           delivery_count, cap, errors || %(error)s::jsonb, payload, created_at
    FROM dead
    RETURNING id
), retried AS (
    UPDATE {schema}.messages r
    SET lease_token = NULL, leased_until = NULL,
        errors = r.errors || %(error)s::jsonb,
        visible_at = now() + least(m.backoff_cap, m.base * power(2, greatest(m.delivery_count - 1, 0)))
                             * (0.5 + random() / 2) * interval '1 second'
    FROM m
    WHERE r.id = m.id AND m.delivery_count < m.cap
    RETURNING r.visible_at, r.queue
)
SELECT m.delivery_count, m.cap, (SELECT id FROM buried), (SELECT visible_at FROM retried),
       (SELECT pg_notify(%(channel)s, {schema}.wake_payload(visible_at) || queue) FROM retried)
FROM m

-- name: dead_letter
-- Straight to the dead letters (rejected, unregistered task, undecodable body, ...).
WITH d AS (
    DELETE FROM {schema}.messages
    WHERE id = %(id)s AND lease_token = %(token)s
    RETURNING *
)
INSERT INTO {schema}.dead_letters (message_id, queue, priority, task_id, task_name, reason,
                                   attempts, max_attempts, errors, payload, enqueued_at)
SELECT id, queue, priority, task_id, task_name, %(reason)s,
       delivery_count, max_attempts, errors || %(error)s::jsonb, payload, created_at
FROM d
RETURNING id, queue, task_id, attempts

-- name: dead_letter_taken
-- A message a no-ack claim already deleted, which turned out not to be a valid message: kept in
-- the dead letters from what the claim returned, payload as stored. Its task id and name are
-- unknown here (the payload could not be read) and its enqueue time was not returned: now().
INSERT INTO {schema}.dead_letters (message_id, queue, priority, task_id, task_name, reason,
                                   attempts, max_attempts, errors, payload, enqueued_at)
VALUES (%(id)s, %(queue)s, %(priority)s, NULL, NULL, %(reason)s,
        %(attempts)s, NULL, %(error)s::jsonb, %(payload)s, now())
RETURNING id

-- name: requeue
-- The consumer gives a message back for immediate redelivery (Kombu's requeue): unlike a failed
-- attempt there is no backoff, and a NOTIFY wakes a waiting consumer at once. Unlike a release,
-- the delivery counts toward the cap (delivery_count stays as the claim left it), so a consumer
-- that always requeues ends, at the cap, in the dead letters (max_attempts) with `error` in the
-- history, instead of looping forever. A lease that is no longer ours is left alone: no row.
WITH m AS (
    SELECT m.id, m.delivery_count,
           coalesce(m.max_attempts, q.max_attempts, %(default_max_attempts)s) AS cap
    FROM {schema}.messages m
    LEFT JOIN {schema}.queues q ON q.name = m.queue
    WHERE m.id = %(id)s AND m.lease_token = %(token)s
    FOR UPDATE OF m
), dead AS (
    DELETE FROM {schema}.messages d
    USING m
    WHERE d.id = m.id AND m.delivery_count >= m.cap
    RETURNING d.*, m.cap
), buried AS (
    INSERT INTO {schema}.dead_letters (message_id, queue, priority, task_id, task_name, reason,
                                       attempts, max_attempts, errors, payload, enqueued_at)
    SELECT id, queue, priority, task_id, task_name, 'max_attempts',
           delivery_count, cap, errors || %(error)s::jsonb, payload, created_at
    FROM dead
    RETURNING id
), requeued AS (
    UPDATE {schema}.messages r
    -- visible_at stays: the message was ready, and it keeps its place in the queue (as a
    -- RabbitMQ requeue does); only unindexed columns change.
    SET lease_token = NULL, leased_until = NULL
    FROM m
    WHERE r.id = m.id AND m.delivery_count < m.cap
    RETURNING r.queue
)
SELECT m.delivery_count, m.cap, (SELECT id FROM buried),
       (SELECT pg_notify(%(channel)s, {schema}.wake_payload(now()) || queue) FROM requeued)
FROM m

-- name: reap
-- Expired leases: the consumer died or stalled. Those with deliveries left go back to their
-- queue (they were deliverable already; clearing the token makes stats count them as ready);
-- those without go to the dead letters. Rows are picked and changed under the same lock, and
-- only while their lease is still expired, so a message acked or re-leased meanwhile is skipped.
WITH expired AS (
    SELECT m.id, m.delivery_count,
           coalesce(m.max_attempts, q.max_attempts, %(default_max_attempts)s) AS cap
    FROM {schema}.messages m
    LEFT JOIN {schema}.queues q ON q.name = m.queue
    WHERE m.lease_token IS NOT NULL AND coalesce(m.leased_until, m.visible_at) <= now()
      -- Not the reaping process's own leases (see claim).
      AND m.id <> ALL(%(held)s::bigint[])
    ORDER BY coalesce(m.leased_until, m.visible_at)
    LIMIT %(limit)s
    FOR UPDATE OF m SKIP LOCKED
), note AS (
    SELECT jsonb_build_array(jsonb_build_object(
        'at', now(), 'worker', null, 'type', 'LeaseExpired',
        'message', 'the consumer holding the message stopped renewing its lease', 'traceback', null)) AS error
), dead AS (
    DELETE FROM {schema}.messages d
    USING expired e
    WHERE d.id = e.id AND e.delivery_count >= e.cap
    RETURNING d.*, e.cap
), buried AS (
    INSERT INTO {schema}.dead_letters (message_id, queue, priority, task_id, task_name, reason,
                                       attempts, max_attempts, errors, payload, enqueued_at)
    SELECT id, queue, priority, task_id, task_name, 'lease_expired',
           delivery_count, cap, errors || (SELECT error FROM note), payload, created_at
    FROM dead
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

-- Durable revokes and task lookup.

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
-- delivery cap falls back on the queue's; the caller applies the transport's default last.
-- A table scan, as in revoke.
SELECT m.id, m.queue, m.task_name, m.priority,
       CASE WHEN NOT {unleased} THEN 'leased' WHEN m.visible_at > now() THEN 'delayed' ELSE 'ready' END,
       m.created_at, m.visible_at, m.leased_by, m.leased_at,
       CASE WHEN NOT {unleased} THEN coalesce(m.leased_until, m.visible_at) END,
       m.delivery_count, coalesce(m.max_attempts, q.max_attempts), m.errors, m.expires_at
FROM {schema}.messages m
LEFT JOIN {schema}.queues q ON q.name = m.queue
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

-- name: scheduled
-- `celery inspect scheduled`: the delayed tasks (ETA, countdown, retry backoff) of a worker's
-- queues, soonest first. The broker holds them, not the worker, so the worker asks the table.
SELECT id, queue, priority, visible_at, payload, delivery_count
FROM {schema}.messages
WHERE queue = ANY(%(queues)s::text[]) AND visible_at > now() AND lease_token IS NULL
  AND task_id IS NOT NULL
ORDER BY visible_at, id
LIMIT %(limit)s

-- Operator statements (dead letters, stats).

-- name: fragment_dead_letter_filter
-- Which dead letters an operator means: every filter is optional, a NULL parameter matches all.
-- (A fragment: inserted where another statement says {dead_letter_filter}.)
(%(queue)s::text IS NULL OR queue = %(queue)s)
  AND (%(task)s::text IS NULL OR task_name = %(task)s)
  AND (%(reason)s::text IS NULL OR reason = %(reason)s)
  AND (%(older_than_s)s::float8 IS NULL OR dead_lettered_at < now() - %(older_than_s)s * interval '1 second')
  AND (%(newer_than_s)s::float8 IS NULL OR dead_lettered_at >= now() - %(newer_than_s)s * interval '1 second')
  AND (%(replayed)s::boolean IS NULL OR (replayed_at IS NOT NULL) = %(replayed)s)
  AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s))

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

-- name: dlq_replay_batch
-- Put a batch of dead letters back on their queues as new messages: attempts start again, the
-- error history comes along, and the dead letter stays (marked replayed) until purged. Run in
-- one transaction for a whole replay, so that it applies entirely or not at all. The wake-up
-- has the publishes' payload (see wake_payload): consumers start the messages at once, not at
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
    RETURNING queue
)
SELECT (SELECT count(*) FROM requeued),
       (SELECT max(id) FROM marked),
       (SELECT count(pg_notify(%(channel)s, {schema}.wake_payload(now()) || queue))
        FROM (SELECT DISTINCT queue FROM requeued) AS q)

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

-- name: dlq_count
SELECT count(*)
FROM {schema}.dead_letters
WHERE {dead_letter_filter}

-- Migrations (kombu_pg/migrate.py).

-- name: migrations_table_exists
-- Read only, so that start-up against a current schema needs no privilege beyond those of
-- `kombu-pg grants`. Raises InsufficientPrivilege when the role may not use the schema.
SELECT to_regclass(format('%%I.schema_migrations', %(schema)s::text)) IS NOT NULL

-- name: applied_migrations
SELECT version FROM {schema}.schema_migrations

-- name: migrate_lock
-- Serializes migrators. Any role that can connect can take this lock, so the wait is bounded:
-- lock_timeout is set for this statement's transaction, and reset by migrate_lock_taken.
WITH bounded AS MATERIALIZED (SELECT set_config('lock_timeout', %(timeout)s::text, true))
SELECT pg_advisory_xact_lock(%(namespace)s::int, hashtext(%(schema)s::text)) FROM bounded

-- name: migrate_lock_taken
-- The migrations themselves wait for table locks under the session's own lock_timeout, and
-- are not cut short by the statement_timeout clients set on their sessions: building an index
-- on a large table may rightly take longer.
SET LOCAL lock_timeout TO DEFAULT; SET LOCAL statement_timeout = 0

-- name: migrate_lock_holders
-- Who holds the migration lock, for the error message of a migrator that timed out.
SELECT l.pid, a.usename, a.application_name
FROM pg_locks l
LEFT JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
  AND l.classid = %(namespace)s::bigint::oid
  AND l.objid = (hashtext(%(schema)s::text)::bigint & 4294967295)::oid
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())

-- name: create_schema
CREATE SCHEMA IF NOT EXISTS {schema}

-- name: create_migrations_table
CREATE TABLE IF NOT EXISTS {schema}.schema_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)

-- name: record_migration
INSERT INTO {schema}.schema_migrations (version, name) VALUES (%(version)s, %(name)s)

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

-- Console (`kombu-pg web`, kombu_pg/web/) and the per-minute counts it reads (kombu_pg/minute_stats.py).

-- name: stats_flush
-- A process's counter deltas since its last flush, added to the minute they fall in (`lag_s`
-- seconds ago: the middle of its counting window), in one statement. With `prune`, rows older
-- than `keep_s` also go (each process asks at most once an hour; the primary key leads with
-- the minute, so that is a range scan).
WITH pruned AS (
    DELETE FROM {schema}.queue_stats
    WHERE %(prune)s AND minute < now() - %(keep_s)s * interval '1 second'
)
INSERT INTO {schema}.queue_stats AS s (minute, queue, event, count)
SELECT date_trunc('minute', now() - %(lag_s)s * interval '1 second'), d.queue, d.event, d.count
FROM unnest(%(queues)s::text[], %(events)s::text[], %(counts)s::bigint[]) AS d(queue, event, count)
ON CONFLICT (minute, queue, event) DO UPDATE SET count = s.count + excluded.count

-- name: console_rates
-- Counts per minute, queue and event over the last `minutes` minutes (the current one included).
SELECT minute, queue, event, sum(count)::bigint
FROM {schema}.queue_stats
WHERE minute >= date_trunc('minute', now()) - %(minutes)s * interval '1 minute'
GROUP BY 1, 2, 3
ORDER BY 1, 2, 3

-- name: console_minute
-- The current minute on the server's clock: the last point of the charts.
SELECT date_trunc('minute', now())

-- name: console_lease_holders
-- Who holds leases now: one row per holder ("<worker>[<pid>]", NULL for a lease taken by a
-- version that did not record it), with its oldest lease's start and its queues. A scan of the
-- messages table (leased_by and leased_at are unindexed so that claims stay HOT updates).
SELECT m.leased_by, min(m.leased_at), count(*), array_agg(DISTINCT m.queue ORDER BY m.queue)
FROM {schema}.messages m
WHERE NOT {unleased}
GROUP BY m.leased_by
ORDER BY m.leased_by NULLS LAST

-- name: console_leases
-- The leased messages themselves, oldest lease first, at most `limit`.
SELECT m.id, m.queue, m.task_id, m.task_name, m.leased_by, m.leased_at,
       coalesce(m.leased_until, m.visible_at), m.delivery_count
FROM {schema}.messages m
WHERE NOT {unleased}
ORDER BY m.leased_at NULLS FIRST, m.id
LIMIT %(limit)s

-- name: console_dead_letter_tasks
-- The task names among the dead letters not yet replayed, for the console's filter.
SELECT DISTINCT task_name FROM {schema}.dead_letters
WHERE replayed_at IS NULL AND task_name IS NOT NULL
ORDER BY 1
LIMIT 200
