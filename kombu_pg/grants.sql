-- What a runtime role (workers, producers, celery beat -S kombu_pg, `kombu-pg stats` and
-- `kombu-pg dlq`) needs on a migrated schema; `kombu-pg grants ROLE` prints these statements
-- with {schema} and {role} quoted. Nothing here lets the role create or alter objects: that is
-- for the role that runs `kombu-pg migrate`. Identity columns need no sequence privilege.

-- Any use of the schema's objects.
GRANT USAGE ON SCHEMA {schema} TO {role};

-- Start-up reads which migrations are applied (and applies none when the schema is current).
GRANT SELECT ON {schema}.schema_migrations TO {role};

-- Messages and queues: publish, claim, ack (acker), renew (lease keeper), release, retry, reap,
-- sweep, purge; dead letters: written by retries and the reaper, read by `kombu-pg stats` and
-- `kombu-pg dlq list`, marked by `dlq replay`, deleted by `dlq purge`.
GRANT SELECT, INSERT, UPDATE, DELETE ON {schema}.messages, {schema}.queues, {schema}.dead_letters TO {role};

-- Exchanges and bindings are declared and deleted, never changed in place.
GRANT SELECT, INSERT, DELETE ON {schema}.exchanges, {schema}.bindings TO {role};

-- The beat scheduler: entries synced from beat_schedule, one row per tick sent (pruned)...
GRANT SELECT, INSERT, UPDATE, DELETE ON {schema}.beat_entries, {schema}.beat_ticks TO {role};
-- ... and the one-row tables of the schedule's revision and of the leader's lease.
GRANT SELECT, UPDATE ON {schema}.beat_revision, {schema}.beat_leader TO {role};

-- Durable revokes: recorded by app.control.revoke and `kombu-pg revoke`, read by claims,
-- expired ids deleted by the housekeeper.
GRANT SELECT, INSERT, UPDATE, DELETE ON {schema}.revoked TO {role};

-- The lease of the one consumer that runs the cluster-wide housekeeping rounds.
GRANT SELECT, UPDATE ON {schema}.housekeeper TO {role};

-- The NOTIFY payload of publishes (PUBLIC may execute functions by default; not everywhere).
GRANT EXECUTE ON FUNCTION {schema}.wake_payload(timestamptz) TO {role};

-- Per-minute event counts (migration 0009): every process adds its own, and prunes old ones.
GRANT SELECT, INSERT, UPDATE, DELETE ON {schema}.queue_stats TO {role};
