-- What the operator's web console (`kombu-pg web`, kombu_pg/web/) reads beyond the operator
-- statements it shares with the CLI: rates from the per-minute counts (stats.sql), who holds
-- leases, the dead letters' task names. One per `-- name:` block (format: kombu_pg/queries.py;
-- fragments: fragments.sql). Values are always bound parameters.

-- name: console_rates
-- Counts per minute, queue and event over the last `minutes` minutes (the current one included).
SELECT minute, queue, event, sum(count)::bigint
FROM {schema}.queue_stats
WHERE minute >= date_trunc('minute', now()) - %(minutes)s::integer * interval '1 minute'
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
