"""The text of the transport's statements, before any server sees it: schema names quoted (a
``%`` in one too), placeholders numbered for libpq, delivery tags read back."""
from __future__ import annotations

import pytest

from kombu_pg.prepared import PreparedStatement
from kombu_pg.queries import for_schema
from kombu_pg.transport import parse_tag

ODD_SCHEMA = 'Odd "name" 100%'
QUOTED = '"Odd ""name"" 100%%"'  # identifier quoting, then % doubled for the placeholder syntax


def statements(schema: str) -> dict[str, str]:
    return for_schema(schema).texts


def test_statements_name_the_schema_quoted_with_its_percent_doubled():
    rendered = statements(ODD_SCHEMA)
    naming = {name: text for name, text in rendered.items() if QUOTED in text}
    assert len(naming) > len(rendered) // 2, "most statements work on the schema's tables"
    for name, text in rendered.items():
        assert "{schema}" not in text and "{" + "fragment" not in text, name
        assert "Odd" not in text.replace(QUOTED, ""), f"{name}: the schema appears unquoted"
        assert not any(line.startswith("--") for line in text.splitlines()), f"{name}: comment block left in"


def test_rendering_is_cached_per_schema():
    assert for_schema(ODD_SCHEMA) is for_schema(ODD_SCHEMA)
    assert for_schema("a") is not for_schema("b")


def test_placeholders_become_numbered_parameters_and_doubled_percent_one():
    statement = PreparedStatement(None, f"SELECT %(b)s, %(a)s, %(b)s FROM {QUOTED}.t WHERE x LIKE 'a%%'")
    assert statement.text == b"SELECT $1, $2, $1 FROM \"Odd \"\"name\"\" 100%\".t WHERE x LIKE 'a%'"
    assert statement.params == ["b", "a"]
    assert statement.name is None
    assert PreparedStatement("publish", "SELECT 1").name == b"publish"


def test_every_statement_converts_to_libpq_placeholders():
    for name, text in statements(ODD_SCHEMA).items():
        converted = PreparedStatement(None, text).text.decode()
        assert "%(" not in converted and "%%" not in converted, name
        assert '"Odd ""name"" 100%"' in converted or QUOTED not in text, name


@pytest.mark.parametrize("tag, parsed", [
    ("42:0f3a", (42, "0f3a")),
    ("42:-", (42, None)),  # delivered without a lease (no-ack consumer)
    ("42", (42, None)),
    (7, (7, None)),
])
def test_delivery_tags_are_row_id_and_lease_token(tag, parsed):
    assert parse_tag(tag) == parsed


def test_a_delivery_tag_without_a_row_id_is_refused():
    with pytest.raises(ValueError):
        parse_tag("x:token")
