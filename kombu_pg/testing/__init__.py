"""Tools for testing against real PostgreSQL servers: servers of a test's own
(:mod:`kombu_pg.testing.server`) that a fault test can restart, freeze or cut off."""
