-- Queues, exchanges and bindings (declared by the transport; counted and purged by `kombu-pg
-- purge`), one per `-- name:` block (format: kombu_pg/queries.py; fragments: fragments.sql).
-- Values are always bound parameters.

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

-- name: mark_via_notify
-- A consumer of short-lived broadcast queues LISTENs on their exchanges' broadcast channels
-- (kombu_pg/broadcasts.py), then says so: publishes send these queues' messages as
-- notifications from now on, not rows (see publish_routed). Only such queues qualify.
UPDATE {schema}.queues SET via_notify = true
WHERE name = ANY(%(queues)s::text[]) AND NOT via_notify
  AND auto_delete AND NOT durable AND message_ttl <= interval '10 seconds'

-- name: unbind
DELETE FROM {schema}.bindings
WHERE exchange = %(exchange)s AND routing_key = %(routing_key)s AND queue = %(queue)s

-- name: bindings_of_exchange
SELECT routing_key, pattern, queue FROM {schema}.bindings WHERE exchange = %(exchange)s

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
