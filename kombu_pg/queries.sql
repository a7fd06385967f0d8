-- Statements of the transport, one per `-- name:` block. `{schema}` is the quoted schema name;
-- values are always bound parameters. Times are compared with the server's now(), never a
-- client clock.

-- name: publish_direct
-- Publish to one queue (the default exchange). The queue's x-message-ttl, if declared, and the
-- message's own expiration both bound expires_at; least() ignores NULLs.
-- The NOTIFY wakes consumers; it is delivered at commit, and coalesced per transaction.
WITH ins AS (
    INSERT INTO {schema}.messages (queue, priority, visible_at, expires_at, payload)
    SELECT %(queue)s, %(priority)s, coalesce(%(eta)s::timestamptz, now()),
           least(now() + q.message_ttl, now() + %(ttl_ms)s * interval '1 millisecond'),
           %(payload)s
    FROM (VALUES (1)) AS one
    LEFT JOIN {schema}.queues q ON q.name = %(queue)s
    RETURNING queue
)
SELECT pg_notify(%(channel)s, queue) FROM ins

-- name: publish_routed
-- Route through an exchange in the database, so that bindings made by other processes count.
-- Returns one row per queue that received the message; none means unroutable.
WITH targets AS (
    SELECT DISTINCT b.queue
    FROM {schema}.bindings b
    JOIN {schema}.exchanges e ON e.name = b.exchange
    WHERE b.exchange = %(exchange)s
      AND CASE e.type
              WHEN 'direct' THEN b.routing_key = %(routing_key)s
              WHEN 'topic'  THEN %(routing_key)s ~ b.pattern
              ELSE true
          END
), ins AS (
    INSERT INTO {schema}.messages (queue, priority, visible_at, expires_at, payload)
    SELECT t.queue, %(priority)s, coalesce(%(eta)s::timestamptz, now()),
           least(now() + q.message_ttl, now() + %(ttl_ms)s * interval '1 millisecond'),
           %(payload)s
    FROM targets t
    LEFT JOIN {schema}.queues q ON q.name = t.queue
    RETURNING queue
)
SELECT pg_notify(%(channel)s, queue) FROM (SELECT DISTINCT queue FROM ins) AS woken

-- name: claim
-- Lease up to `limit` deliverable messages. SKIP LOCKED lets concurrent consumers take disjoint
-- rows without waiting; rows whose lease expired are deliverable again (visible_at passed).
WITH c AS (
    SELECT id
    FROM {schema}.messages
    WHERE queue = %(queue)s
      AND visible_at <= now()
      AND (expires_at IS NULL OR expires_at > now())
    ORDER BY priority DESC, visible_at, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE {schema}.messages m
SET lease_token = gen_random_uuid(),
    visible_at = now() + %(lease_seconds)s * interval '1 second',
    delivery_count = m.delivery_count + 1
FROM c
WHERE m.id = c.id
RETURNING m.id, m.lease_token, m.delivery_count, m.priority, m.payload

-- name: ack
-- Guarded by the token: a lease that expired and went to another consumer is not ours to delete.
DELETE FROM {schema}.messages m
USING unnest(%(ids)s::bigint[], %(tokens)s::uuid[]) AS a(id, token)
WHERE m.id = a.id AND m.lease_token = a.token

-- name: release
-- Give the message back at once (reject with requeue, shutdown): no copy, same row.
UPDATE {schema}.messages m
SET lease_token = NULL, visible_at = now()
FROM unnest(%(ids)s::bigint[], %(tokens)s::uuid[]) AS a(id, token)
WHERE m.id = a.id AND m.lease_token = a.token

-- name: renew
-- Extend leases still held; the ids returned are the leases that are still ours.
UPDATE {schema}.messages m
SET visible_at = now() + %(lease_seconds)s * interval '1 second'
FROM unnest(%(ids)s::bigint[], %(tokens)s::uuid[]) AS a(id, token)
WHERE m.id = a.id AND m.lease_token = a.token
RETURNING m.id

-- name: size
-- Ready messages only, like AMQP's message_count (leased and delayed ones are not counted).
SELECT count(*) FROM {schema}.messages
WHERE queue = %(queue)s AND visible_at <= now() AND (expires_at IS NULL OR expires_at > now())

-- name: purge
-- Ready messages only: leased messages belong to a consumer, delayed (ETA) ones are not due yet.
DELETE FROM {schema}.messages WHERE queue = %(queue)s AND visible_at <= now()

-- name: declare_queue
INSERT INTO {schema}.queues (name, durable, auto_delete, expires, message_ttl)
VALUES (%(queue)s, %(durable)s, %(auto_delete)s,
        %(expires_ms)s * interval '1 millisecond', %(message_ttl_ms)s * interval '1 millisecond')
ON CONFLICT (name) DO UPDATE
SET durable = excluded.durable, auto_delete = excluded.auto_delete,
    expires = excluded.expires, message_ttl = excluded.message_ttl, last_used = now()

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

-- name: touch_queues
-- Consumers mark their queues as used, which keeps queues with x-expires alive.
UPDATE {schema}.queues SET last_used = now() WHERE name = ANY(%(queues)s::text[])

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
INSERT INTO {schema}.bindings (exchange, routing_key, pattern, queue)
VALUES (%(exchange)s, %(routing_key)s, %(pattern)s, %(queue)s)
ON CONFLICT DO NOTHING

-- name: unbind
DELETE FROM {schema}.bindings
WHERE exchange = %(exchange)s AND routing_key = %(routing_key)s AND queue = %(queue)s

-- name: bindings_of_exchange
SELECT routing_key, pattern, queue FROM {schema}.bindings WHERE exchange = %(exchange)s

-- name: sweep_try_lock
-- One sweeper at a time across all processes; the others skip this round.
SELECT pg_try_advisory_xact_lock(%(lock_key)s)

-- name: sweep_expired_queues
-- x-expires: unused queues, with their bindings and messages. Auto-delete queues declared
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

-- name: sweep_expired_messages
DELETE FROM {schema}.messages WHERE expires_at <= now()

-- name: claim_no_ack
-- For consumers that do not acknowledge (remote-control and event receivers): taking the message
-- is deleting it, as with AMQP's no_ack.
WITH c AS (
    SELECT id
    FROM {schema}.messages
    WHERE queue = %(queue)s
      AND visible_at <= now()
      AND (expires_at IS NULL OR expires_at > now())
    ORDER BY priority DESC, visible_at, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
DELETE FROM {schema}.messages m
USING c
WHERE m.id = c.id
RETURNING m.id, NULL::uuid, m.delivery_count + 1, m.priority, m.payload
