-- Broadcasts without rows (kombu_pg/broadcasts.py).
--
-- A short-lived broadcast queue (auto-delete, not durable, messages expiring within 10 s:
-- Celery's gossip and event-receiver queues) whose consumer listens for broadcasts gets its
-- messages as NOTIFY payloads instead of rows: the consumer sets `via_notify` once it LISTENs
-- on the exchange's broadcast channel, and publishes then send one notification for all such
-- queues of the exchange (see publish_routed). A queue whose consumer cannot LISTEN (behind a
-- transaction pooler without direct_url) keeps rows. A constant default: a catalog change,
-- instant on a table of any size; workers of earlier versions leave it false.
ALTER TABLE {schema}.queues ADD COLUMN IF NOT EXISTS via_notify boolean NOT NULL DEFAULT false;
