-- Statements of every connection, one per `-- name:` block (see kombu_pg/queries.py for the
-- format). Values are always bound parameters.

-- name: session_setup
-- Every connection of the transport: a statement the server cannot finish in time is cancelled
-- (the client also gives up on a server that does not answer at all: kombu_pg/deadline.py).
SELECT set_config('statement_timeout', %(statement_timeout)s, false)

-- name: server_backend_pid
-- Pooler detection (kombu_pg/pooler.py): a client of PostgreSQL itself got this process id in
-- the handshake; a client of a pooler such as PgBouncer got a key the pooler made up instead.
SELECT pg_backend_pid()

-- name: listen
-- The LISTEN connection's only statement (kombu_pg/listener.py): consumers' wake-ups (see
-- fragment_wake) and binding changes arrive on `channel` (option notify_channel), an
-- identifier quoted at run time.
LISTEN {channel}
