-- Per-minute event counts (table queue_stats, migration 0009), written by every process that
-- uses the broker (kombu_pg/minute_stats.py) and read by the console (console.sql), one per
-- `-- name:` block (format: kombu_pg/queries.py). Values are always bound parameters.

-- name: stats_flush
-- A process's counter deltas since its last flush, added to the minute they fall in (`lag_s`
-- seconds ago: the middle of its counting window), in one statement. With `prune`, rows older
-- than `keep_s` also go (each process asks at most once an hour; the primary key leads with
-- the minute, so that is a range scan).
WITH pruned AS (
    DELETE FROM {schema}.queue_stats
    WHERE %(prune)s::boolean AND minute < now() - %(keep_s)s::float8 * interval '1 second'
)
INSERT INTO {schema}.queue_stats AS s (minute, queue, event, count)
SELECT date_trunc('minute', now() - %(lag_s)s::float8 * interval '1 second'), d.queue, d.event, d.count
FROM unnest(%(queues)s::text[], %(events)s::text[], %(counts)s::bigint[]) AS d(queue, event, count)
ON CONFLICT (minute, queue, event) DO UPDATE SET count = s.count + excluded.count
