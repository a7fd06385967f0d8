"""Broker URLs (kombu_pg.config): what libpq gets, and passwords masked wherever a URL is shown."""
from __future__ import annotations

import pytest
from psycopg.conninfo import conninfo_to_dict

from kombu_pg.config import (ConfigurationError, conninfo_from_parts, mask_url, masked, scrub,
                             to_conninfo)


@pytest.mark.parametrize("scheme", ["postgresql", "postgres", "pg", "PG"])
def test_every_scheme_becomes_a_libpq_uri_with_its_parameters(scheme):
    conninfo = to_conninfo(f"{scheme}://u:pw@db.example:6543/app?sslmode=require&application_name=x")
    assert conninfo.startswith("postgresql://")
    assert conninfo_to_dict(conninfo) == {"user": "u", "password": "pw", "host": "db.example", "port": "6543",
                                          "dbname": "app", "sslmode": "require", "application_name": "x"}


def config_error(url: str) -> str:
    with pytest.raises(ConfigurationError) as info:
        to_conninfo(url)
    message = str(info.value)
    assert "\n" not in message and "s3cret" not in message
    return message


def test_sqlalchemy_style_url_names_the_url_to_write():
    message = config_error("postgresql+psycopg://u:s3cret@h/db")
    assert "'+psycopg' names a SQLAlchemy driver" in message
    assert "write 'postgresql://u:**@h/db'" in message


@pytest.mark.parametrize("url", ["redis://u:s3cret@h/0", "u:s3cret@h/db"])
def test_other_schemes_are_refused_naming_the_ones_understood(url):
    assert "expected postgresql://, postgres:// or pg://" in config_error(url)


def test_malformed_url_is_one_line_without_its_password():
    assert config_error("postgresql://u:s3cret@h/db?sslmode").startswith("invalid PostgreSQL broker URL")


def test_failover_list_becomes_one_conninfo_naming_every_host_in_order():
    conninfo = to_conninfo("postgresql://u:pw@h1:5432/db;postgresql://u:pw@h2:5433,h3/db")
    params = conninfo_to_dict(conninfo)
    assert params["host"] == "h1,h2,h3" and params["port"] == "5432,5433,"  # h3: libpq's default
    assert params["dbname"] == "db" and params["password"] == "pw"


def test_failover_list_differing_in_more_than_hosts_names_the_fix():
    with pytest.raises(ConfigurationError) as info:
        to_conninfo("postgresql://u:s3cret@h1/db;postgresql://u:s3cret@h2/other")
    message = str(info.value)
    assert "differ in more than hosts and ports" in message and "s3cret" not in message
    assert "target_session_attrs=read-write" in message


def test_connection_parts_without_a_url():
    assert conninfo_to_dict(conninfo_from_parts("h", 5433, "u", "pw", "/app")) == {
        "host": "h", "port": "5433", "user": "u", "password": "pw", "dbname": "app"}
    assert conninfo_to_dict(conninfo_from_parts(None, None, None, None, "/")) == {"host": "localhost"}


@pytest.mark.parametrize("url, shown", [
    ("postgresql://u:s3cret@h/db", "postgresql://u:**@h/db"),
    ("postgresql://u@h/db", "postgresql://u@h/db"),
    ("postgresql://u:s3cret@h1:5432,h2:5433/db?sslmode=require", "postgresql://u:**@h1:5432,h2:5433/db?sslmode=require"),
    ("postgresql:///db?host=h1,h2&password=s3cret&sslmode=verify-full",
     "postgresql:///db?host=h1,h2&password=**&sslmode=verify-full"),
    ("pg://u@h/db?sslpassword=s3cret#frag", "pg://u@h/db?sslpassword=**#frag"),
    ("pg://u:p@ss:s3cret@h/db", "pg://u:**@h/db"),  # '@' in the password: the last one ends it
    ("host=h password='s3 \\'cret' dbname=db", "host=h password=** dbname=db"),
    ("host=h password=s3cret", "host=h password=**"),
    ("u:s3cret@h/db", "u:**@h/db"),  # the scheme left out
])
def test_mask_url_masks_the_password_and_nothing_else(url, shown):
    assert mask_url(url) == shown


def test_masked_walks_mappings_sequences_and_failover_lists():
    value = {"broker": "pg://u:s3cret@h/db",
             "options": {"listen_url": "postgresql://u:s3cret@h2/db", "schema": "kombu_pg"},
             "alt": ("pg://a:s3cret@h1/db;pg://a:s3cret@h2/db", 5), "plain": "no://url here"}
    assert masked(value, "xx") == {"broker": "pg://u:xx@h/db",
                                   "options": {"listen_url": "postgresql://u:xx@h2/db", "schema": "kombu_pg"},
                                   "alt": ("pg://a:xx@h1/db;pg://a:xx@h2/db", 5), "plain": "no://url here"}
    assert "s3cret" not in repr(masked(value))


def test_scrub_makes_a_libpq_error_one_line_without_the_password():
    error = 'connection to server at "h" failed:\n  FATAL:  password authentication failed ("s3cret")'
    text = scrub(error, "postgresql://u:s3cret@h/db")
    assert text == 'connection to server at "h" failed: FATAL: password authentication failed ("**")'
    assert scrub("a\nb", None) == "a b"
