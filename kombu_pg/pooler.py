"""Transaction poolers between the transport and PostgreSQL (PgBouncer ``pool_mode=transaction``).

Such a pooler lends a server connection to a client for one transaction at a time, so whatever
lives in a session is shared with other clients or lost: named prepared statements (ours, and
psycopg's automatic ones), session settings, LISTEN, and anything tied to ``pg_backend_pid()``.
Behind one the transport prepares nothing by name, sets nothing on the session, and takes what
needs a session of its own (LISTEN, beat's leader election) over ``direct_url``.
"""
from __future__ import annotations

import psycopg

from .config import ConfigurationError
from .store import Store


def detect(conn: psycopg.Connection, store: Store) -> bool:
    """Whether ``conn`` goes through a pooler: the process id that the handshake announced is
    not the one of the server process running our statements. Session and transaction pooling
    look alike here; both are then treated as transaction pooling, which is safe under either."""
    return store.server_backend_pid(conn) != conn.info.backend_pid


def session_required(feature: str) -> ConfigurationError:
    """The error for a feature that needs a session when only a transaction pooler is known."""
    return ConfigurationError(
        f"{feature} needs a database session of its own, which a transaction pooler does not keep: "
        "set the transport option direct_url to a URL that reaches PostgreSQL directly "
        "(or pooler='none' if the pooler pools sessions)")
