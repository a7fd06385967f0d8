-- Per-minute event counts per queue (published, delivered, acked, retried, dead_lettered, ...),
-- for rates that outlive the processes that counted them (`kombu-pg web`).
--
-- Each process adds the deltas of its in-process counters (kombu_pg/counters.py) at most once a
-- minute, in one upsert, and only when it counted something: an idle process writes nothing.
-- Rows older than about a day are deleted by the writers themselves (each at most once an hour).
CREATE TABLE IF NOT EXISTS {schema}.queue_stats (
    -- The minute the counts fall in (the middle of the flushing process's counting window).
    minute timestamptz NOT NULL,
    queue  text        NOT NULL,
    event  text        NOT NULL,
    count  bigint      NOT NULL,
    PRIMARY KEY (minute, queue, event)
);
