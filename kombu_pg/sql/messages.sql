-- Statements on messages: publish, claim, settle (ack, release, renew, requeue, fail, dead
-- letter) and the consumers' polls, one per `-- name:` block (format: kombu_pg/queries.py;
-- fragments: fragments.sql). `{schema}` is the quoted schema name; values are always bound
-- parameters. Times are compared with the server's now(), never a client clock.

-- name: publish_direct
-- Publish to one queue (the default exchange). The queue's x-message-ttl, if declared, and the
-- message's own expiration both bound expires_at; least() ignores NULLs.
-- The NOTIFY wakes consumers; it is delivered at commit, and identical ones are coalesced per
-- transaction. Its payload says when the message becomes visible (see fragment_wake). It costs
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
SELECT queue, CASE WHEN %(notify)s THEN {wake} END, false AS broadcast
FROM ins

-- name: publish_routed
-- Route through an exchange in the database, so that bindings made by other processes count.
-- Returns one row per queue that received the message, and whether as a broadcast; none means
-- unroutable (or, with a unique key, a duplicate in every queue).
-- Short-lived broadcast queues (auto-delete, not durable, x-message-ttl of 10 s at most:
-- Celery's gossip and event-receiver queues) are `transient`. Every worker's heartbeat goes to
-- every worker's gossip queue, so their messages get no row when their consumer listens for
-- broadcasts (`via_notify`, migration 0010): ONE notification on the exchange's broadcast
-- channel carries the message to all of them, "<priority>\n<routing key as JSON>\n<payload>",
-- and each listening consumer routes it to its own queues (kombu_pg/broadcasts.py). At most
-- once, like the queues themselves: a consumer that is not listening at that moment misses it.
-- A message too big for a notification (8000 bytes) is stored as rows and wakes them. A
-- transient queue whose consumer does not listen gets rows without a wake-up: the consumer
-- claims it on a timer (Channel.polled_interval); a NOTIFY would wake every LISTEN session.
WITH targets AS (
    SELECT DISTINCT b.queue, q.message_ttl,
           coalesce(q.auto_delete AND NOT q.durable AND q.message_ttl <= interval '10 seconds', false) AS transient,
           coalesce(q.via_notify, false) AS via_notify
    FROM {schema}.bindings b
    JOIN {schema}.exchanges e ON e.name = b.exchange
    LEFT JOIN {schema}.queues q ON q.name = b.queue
    WHERE b.exchange = %(exchange)s
      AND CASE e.type
              WHEN 'direct' THEN b.routing_key = %(routing_key)s
              WHEN 'topic'  THEN %(routing_key)s ~ b.pattern
              ELSE true
          END
), broadcast AS (
    -- Volatile (pg_notify), so evaluated once, and only when a listening transient queue matched.
    SELECT pg_notify(%(broadcast_channel)s, note) AS sent
    FROM (SELECT %(priority)s::smallint::text || E'\n' || to_json(%(routing_key)s::text)::text
                 || E'\n' || %(payload)s AS note) AS n
    WHERE octet_length(note) < 8000
      AND EXISTS (SELECT 1 FROM targets WHERE transient AND via_notify)
), broadcasted AS (
    SELECT t.queue FROM targets t WHERE t.transient AND t.via_notify AND EXISTS (SELECT 1 FROM broadcast)
), ins AS (
    INSERT INTO {schema}.messages
        (queue, priority, visible_at, expires_at, payload, task_id, task_name, max_attempts, unique_key)
    SELECT t.queue, %(priority)s, coalesce(%(eta)s::timestamptz, now()),
           least(now() + t.message_ttl, now() + %(ttl_ms)s * interval '1 millisecond'),
           %(payload)s, %(task_id)s, %(task_name)s, %(max_attempts)s, %(unique_key)s
    FROM targets t
    WHERE t.queue NOT IN (SELECT queue FROM broadcasted)
    {on_duplicate_key}
)
SELECT queue, CASE WHEN %(notify)s AND NOT (t.transient AND NOT t.via_notify) THEN {wake} END, false
FROM ins
JOIN targets t USING (queue)
UNION ALL
SELECT queue, NULL, true FROM broadcasted

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
    FROM {schema}.messages m
    WHERE queue = %(queue)s
      AND visible_at <= now()
      AND {unleased}
      AND (expires_at IS NULL OR expires_at > now() OR task_id IS NOT NULL)
      -- An expired lease that used up its deliveries is the reaper's, for the dead letters.
      AND (lease_token IS NULL OR delivery_count < {attempt_cap})
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
    RETURNING m.queue, m.visible_at
)
SELECT queue, {wake}
FROM (SELECT queue, min(visible_at) AS visible_at FROM released GROUP BY queue) AS r

-- name: renew
-- Extend leases still held; the ids returned are the leases that are still ours.
WITH {lease_commit}
UPDATE {schema}.messages m
SET leased_until = now() + %(lease_seconds)s * interval '1 second'
FROM unnest(%(ids)s::bigint[], %(tokens)s::uuid[]) AS a(id, token), lease_commit
WHERE m.id = a.id AND m.lease_token = a.token
RETURNING m.id

-- name: requeue
-- The consumer gives a message back for immediate redelivery (Kombu's requeue): unlike a failed
-- attempt there is no backoff, and a NOTIFY wakes a waiting consumer at once. Unlike a release,
-- the delivery counts toward the cap (delivery_count stays as the claim left it), so a consumer
-- that always requeues ends, at the cap, in the dead letters (max_attempts) with `error` in the
-- history, instead of looping forever. A lease that is no longer ours is left alone: no row.
WITH m AS (
    SELECT m.id, m.delivery_count, {attempt_cap} AS cap
    FROM {schema}.messages m
    WHERE m.id = %(id)s AND m.lease_token = %(token)s
    FOR UPDATE
), dead AS (
    DELETE FROM {schema}.messages d
    USING m
    WHERE d.id = m.id AND m.delivery_count >= m.cap
    RETURNING d.*, m.cap, 'max_attempts' AS reason, %(error)s::jsonb AS error
), buried AS (
    {dead_letter_insert}
    RETURNING id
), requeued AS (
    UPDATE {schema}.messages r
    -- visible_at stays: the message was ready, and it keeps its place in the queue (as a
    -- RabbitMQ requeue does); only unindexed columns change.
    SET lease_token = NULL, leased_until = NULL
    FROM m
    WHERE r.id = m.id AND m.delivery_count < m.cap
    RETURNING r.queue, r.visible_at
)
SELECT m.delivery_count, m.cap, (SELECT id FROM buried), (SELECT {wake} FROM requeued)
FROM m

-- name: fail
-- A processing attempt failed (the task raised, its worker was lost): decided here from
-- the persisted delivery count, in one statement. Below the cap the message is retried after an
-- exponential backoff with jitter (half to all of min(cap, base * 2^(attempt-1)) seconds); at the
-- cap it moves to the dead letters. Either way the attempt's error joins the history. A message
-- whose lease is no longer ours (acked, or re-leased elsewhere) is left alone: no row returned.
WITH m AS (
    SELECT m.id, m.delivery_count,
           -- The task's max_attempts as the worker knows it now comes first.
           coalesce(%(max_attempts)s::int, {attempt_cap}) AS cap,
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
    RETURNING d.*, m.cap, %(dead_reason)s::text AS reason, %(error)s::jsonb AS error
), buried AS (
    {dead_letter_insert}
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
       (SELECT {wake} FROM retried)
FROM m

-- name: dead_letter
-- Straight to the dead letters (rejected, unregistered task, undecodable body, ...).
WITH dead AS (
    DELETE FROM {schema}.messages
    WHERE id = %(id)s AND lease_token = %(token)s
    RETURNING *, max_attempts AS cap, %(reason)s::text AS reason, %(error)s::jsonb AS error
)
{dead_letter_insert}
RETURNING id, queue, task_id, attempts

-- name: dead_letter_taken
-- A message a no-ack claim already deleted, which turned out not to be a valid message: kept in
-- the dead letters from what the claim returned, payload as stored. Its task id and name are
-- unknown here (the payload could not be read) and its enqueue time was not returned: now().
WITH dead (id, queue, priority, task_id, task_name, delivery_count, errors, payload, created_at,
          cap, reason, error) AS (
    VALUES (%(id)s::bigint, %(queue)s::text, %(priority)s::smallint, NULL::text, NULL::text,
            %(attempts)s::int, '[]'::jsonb, %(payload)s::text, now(), NULL::int, %(reason)s::text,
            %(error)s::jsonb)
)
{dead_letter_insert}
RETURNING id

-- name: size
-- Ready messages only, like AMQP's message_count (leased and delayed ones are not counted).
-- Expired tasks are ready: the claim delivers them (to be revoked).
SELECT count(*) FROM {schema}.messages
WHERE queue = %(queue)s AND visible_at <= now() AND {unleased}
  AND (expires_at IS NULL OR expires_at > now() OR task_id IS NOT NULL)

-- name: purge
-- Ready messages only: leased messages belong to a consumer, delayed (ETA) ones are not due yet.
DELETE FROM {schema}.messages WHERE queue = %(queue)s AND visible_at <= now() AND {unleased}

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

-- name: scheduled
-- `celery inspect scheduled`: the delayed tasks (ETA, countdown, retry backoff) of a worker's
-- queues, soonest first. The broker holds them, not the worker, so the worker asks the table.
SELECT id, queue, priority, visible_at, payload, delivery_count
FROM {schema}.messages
WHERE queue = ANY(%(queues)s::text[]) AND visible_at > now() AND lease_token IS NULL
  AND task_id IS NOT NULL
ORDER BY visible_at, id
LIMIT %(limit)s
