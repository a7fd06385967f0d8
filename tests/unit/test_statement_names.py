"""The statement names the store is typed with are those of the .sql files."""
from __future__ import annotations

from kombu_pg import queries
from kombu_pg.store.names import STATEMENT_NAMES


def test_the_typed_names_are_the_statements_of_the_sql_files():
    assert STATEMENT_NAMES == queries.NAMES
