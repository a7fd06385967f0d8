-- Leases move out of every index, so that taking, renewing and giving back a lease are HOT
-- updates: the new row version goes into the same page and no index gets a new entry.
--
-- Before, a claim moved `visible_at` (a column of the claim index) to the lease's end, and a
-- partial index keyed on `lease_token` listed leased rows: every claim was a non-HOT update
-- that added an entry to three indexes, and under steady traffic dead index entries piled up
-- between autovacuum passes faster than claims could skip them. Now `visible_at` is only ever
-- the time a message becomes ready (publish, ETA, retry backoff), and a lease is
-- (`lease_token`, `leased_until`), columns no index covers. A message is deliverable when
-- visible_at <= now() and it has no live lease.
--
-- Instant on a table of any size: a nullable column without a default is a catalog change.
ALTER TABLE {schema}.messages SET (fillfactor = 50);
ALTER TABLE {schema}.messages ADD COLUMN IF NOT EXISTS leased_until timestamptz;

-- The reaper now scans for expired leases (they are few, and it runs in one process at a time);
-- an index on a lease column would make every claim a non-HOT update again.
DROP INDEX IF EXISTS {schema}.messages_leased_idx;

-- Rolling upgrades: a worker still running the previous version claims by moving visible_at
-- (and sees a row leased by a new worker as ready). This guard keeps it from taking a lease a
-- new worker holds; it costs the new code nothing, since the new claim never sets visible_at
-- (the trigger fires only for updates of that column, and its WHEN clause is checked before
-- any function call). Rows the old version leases keep working for the new one: their lease is
-- visible_at in the future, with leased_until NULL.
CREATE OR REPLACE FUNCTION {schema}.keep_live_leases() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.leased_until > now() THEN
        RETURN NULL;  -- skip the row: its lease is live
    END IF;
    RETURN NEW;
END
$$;

DROP TRIGGER IF EXISTS messages_keep_live_leases ON {schema}.messages;
CREATE TRIGGER messages_keep_live_leases
    BEFORE UPDATE OF visible_at ON {schema}.messages
    FOR EACH ROW
    WHEN (OLD.lease_token IS NOT NULL AND NEW.lease_token IS NOT NULL
          AND NEW.lease_token IS DISTINCT FROM OLD.lease_token)
    EXECUTE FUNCTION {schema}.keep_live_leases();
