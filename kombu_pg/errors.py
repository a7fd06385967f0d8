"""The errors that mean "the connection is gone, not the statement wrong": one set for the
whole package (Kombu's ``connection_errors``, retries on a fresh connection, lease renewal).

A session on a server that accepts no writes (a demoted primary) raises ReadOnlyServer, an
OperationalError (kombu_pg/failover.py), so it is one of them.
"""
from __future__ import annotations

import psycopg
from psycopg_pool import PoolTimeout

CONNECTION_ERRORS: tuple[type[Exception], ...] = (psycopg.OperationalError, psycopg.InterfaceError,
                                                  PoolTimeout)
