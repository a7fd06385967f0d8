-- The NOTIFY payload is "<milliseconds until visible> <queue>": a consumer woken for a message
-- with an ETA or a retry backoff sets a timer for it instead of waiting for its next poll.
CREATE OR REPLACE FUNCTION {schema}.wake_payload(visible_at timestamptz) RETURNS text
    LANGUAGE sql STABLE PARALLEL SAFE
    RETURN greatest(0, ceil(extract(epoch FROM visible_at - now()) * 1000))::bigint::text || ' ';
