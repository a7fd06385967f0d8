-- Migrations (kombu_pg/migrate.py): the bookkeeping around the numbered files of migrations/,
-- one per `-- name:` block (format: kombu_pg/queries.py). Values are always bound parameters.

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
