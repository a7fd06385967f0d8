-- The housekeeper: the one consumer process that runs the cluster-wide rounds (expired queues
-- and messages, expired leases back to their queues with a wake-up, expired tasks to the dead
-- letters), so that idle workers cost the server almost nothing. One row, a lease: consumers
-- take it at their safety-net poll once it has run out (or was given up at shutdown), and the
-- holder renews it at each round. A holder that dies or stalls (a solo worker running a long
-- task) stops renewing, and another consumer takes over.
CREATE TABLE IF NOT EXISTS {schema}.housekeeper (
    id            boolean     PRIMARY KEY DEFAULT true CHECK (id),
    -- Who holds it: "<worker or host name>[<pid>] <random>", as in its connections' names.
    holder        text,
    leader_until  timestamptz,
    elected_at    timestamptz,
    last_round_at timestamptz
);
INSERT INTO {schema}.housekeeper (id) VALUES (true) ON CONFLICT DO NOTHING;
