-- Core tables of the transport. `{schema}` is replaced by the quoted schema name; every
-- statement is idempotent so a half-applied migration can simply be run again.

CREATE SCHEMA IF NOT EXISTS {schema};

-- One row per message per queue (a fanout publish writes one row per bound queue).
CREATE TABLE IF NOT EXISTS {schema}.messages (
    id             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue          text        NOT NULL,
    -- Higher is delivered first, as in RabbitMQ (0..255).
    priority       smallint    NOT NULL DEFAULT 0,
    -- A row is deliverable once visible_at <= now(). Publishing with an ETA sets it in the
    -- future; claiming moves it to the end of the lease. An expired lease therefore makes the
    -- row deliverable again with no reaper in between.
    visible_at     timestamptz NOT NULL DEFAULT now(),
    -- Message TTL (x-message-ttl or the message's expiration): never delivered after this.
    expires_at     timestamptz,
    -- Set while leased. Ack, renew and release match (id, lease_token), so a consumer whose
    -- lease expired and was re-claimed elsewhere cannot ack or release the new delivery.
    lease_token    uuid,
    delivery_count integer     NOT NULL DEFAULT 0,
    created_at     timestamptz NOT NULL DEFAULT now(),
    -- The Kombu message (body, headers, properties) as JSON text: never parsed by the server.
    payload        text        NOT NULL
) WITH (
    -- Claims update rows in place: leave room for HOT updates, and vacuum the hot table often.
    fillfactor = 70,
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_insert_scale_factor = 0.02
);

-- The claim walks this index in delivery order: priority first, then readiness time.
CREATE INDEX IF NOT EXISTS messages_claim_idx
    ON {schema}.messages (queue, priority DESC, visible_at, id);

-- Lets the sweeper find messages past their TTL without scanning the table.
CREATE INDEX IF NOT EXISTS messages_expires_idx
    ON {schema}.messages (expires_at) WHERE expires_at IS NOT NULL;

CREATE TABLE IF NOT EXISTS {schema}.queues (
    name        text        PRIMARY KEY,
    durable     boolean     NOT NULL DEFAULT true,
    auto_delete boolean     NOT NULL DEFAULT false,
    -- x-expires: the queue, its bindings and its messages go once unused this long.
    expires     interval,
    -- x-message-ttl: applied to every message published to the queue.
    message_ttl interval,
    -- Refreshed by declaring and by consumers while they consume.
    last_used   timestamptz NOT NULL DEFAULT now(),
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Exchanges and bindings live here, not in process memory, so that a message published in one
-- process is routed to a queue bound in another (worker replies to `celery inspect`).
CREATE TABLE IF NOT EXISTS {schema}.exchanges (
    name        text    PRIMARY KEY,
    type        text    NOT NULL CHECK (type IN ('direct', 'topic', 'fanout')),
    durable     boolean NOT NULL DEFAULT true,
    auto_delete boolean NOT NULL DEFAULT false
);

CREATE TABLE IF NOT EXISTS {schema}.bindings (
    exchange    text NOT NULL,
    routing_key text NOT NULL,
    -- For topic exchanges: the routing key pattern as a POSIX regular expression.
    pattern     text NOT NULL DEFAULT '',
    queue       text NOT NULL,
    PRIMARY KEY (exchange, routing_key, queue)
);
CREATE INDEX IF NOT EXISTS bindings_queue_idx ON {schema}.bindings (queue);
