"""Transport options (kombu_pg.config.Options): defaults, coercion of what Celery settings and
URLs carry (strings), and a one-line error naming the option and the fix for anything else."""
from __future__ import annotations

import pytest

from kombu_pg.config import ConfigurationError, Options, application_name, client_name


def test_defaults_when_nothing_is_given():
    assert Options.from_transport_options({}) == Options.from_transport_options(None) == Options()
    assert Options().schema == "kombu_pg" and Options().pooler == "auto"


@pytest.mark.parametrize("raw, expected", [
    ({"visibility_timeout": "45"}, {"visibility_timeout": 45.0}),
    ({"max_connections": "7"}, {"max_connections": 7}),
    ({"listen": "off", "auto_migrate": "Yes"}, {"listen": False, "auto_migrate": True}),
    ({"listen": False}, {"listen": False}),
    ({"listen_url": None}, {"listen_url": None}),
    ({"queue_options": {"q": {"max_attempts": 2}}}, {"queue_options": {"q": {"max_attempts": 2}}}),
])
def test_values_are_coerced_to_the_options_types(raw, expected):
    options = Options.from_transport_options(raw)
    assert {key: getattr(options, key) for key in expected} == expected
    for key, value in expected.items():
        assert type(getattr(options, key)) is type(value)


def test_options_kombu_itself_reads_are_passed_over():
    options = Options.from_transport_options({"max_retries": 3, "interval_start": 0, "body_encoding": "base64"})
    assert options == Options()


def one_line_error(raw: dict) -> str:
    with pytest.raises(ConfigurationError) as info:
        Options.from_transport_options(raw)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_option_names_itself_and_the_known_ones():
    message = one_line_error({"visiblity_timeout": 10})
    assert "'visiblity_timeout'" in message
    assert "known options:" in message and "visibility_timeout" in message and "schema" in message


@pytest.mark.parametrize("raw, says", [
    ({"visibility_timeout": "soon"}, "'visibility_timeout' must be a float, got 'soon'"),
    ({"listen": "maybe"}, "'listen' must be a bool, got 'maybe'"),
    ({"listen": 1}, "'listen' must be a bool"),
    ({"max_connections": [4]}, "'max_connections' must be a int"),
    ({"queue_options": {"q": 3}}, "'queue_options' must be a dict"),
    ({"schema": ""}, "'schema' must be 1 to 50 bytes long"),
    ({"schema": "é" * 26}, "'schema' must be 1 to 50 bytes long"),
    ({"visibility_timeout": 0.5}, "'visibility_timeout' must be >= 1 second"),
    ({"polling_interval": 0}, "'polling_interval' must be > 0"),
    ({"statement_timeout": -1}, "'statement_timeout' must be > 0 seconds"),
    ({"pooler": "session"}, "'pooler' must be one of 'auto', 'transaction', 'none', got 'session'"),
    ({"max_attempts": 0}, "'max_attempts' must be >= 1"),
    ({"queue_options": {"q": {"max_atempts": 2}}}, "queue 'q': unknown keys ['max_atempts']"),
])
def test_bad_values_give_one_line_naming_the_option(raw, says):
    assert says in one_line_error(raw)


def test_the_longest_schema_name_is_accepted():
    assert Options.from_transport_options({"schema": "s" * 50}).schema == "s" * 50


def test_queue_policy_overrides_the_global_values_key_by_key():
    options = Options.from_transport_options(
        {"max_attempts": 4, "backoff_base": 2, "queue_options": {"slow": {"backoff_cap": 10}}})
    assert options.policy("slow") == {"max_attempts": 4, "backoff_base": 2.0, "backoff_cap": 10}
    assert options.policy("other") == {"max_attempts": 4, "backoff_base": 2.0, "backoff_cap": 300.0}


def test_equal_options_hash_alike_even_with_dict_values():
    # The transport keys its per-process connection pools by options.
    a = Options.from_transport_options({"queue_options": {"q": {"max_attempts": 2}}})
    b = Options.from_transport_options({"queue_options": {"q": {"max_attempts": 2}}})
    assert a == b and hash(a) == hash(b)
    assert hash(a) != hash(Options())


def test_derived_intervals():
    options = Options.from_transport_options({"polling_interval": 5, "max_polling_interval": 2,
                                              "sweep_interval": 0.5, "statement_timeout": 1.5})
    assert options.idle_polling_interval == 5  # never below polling_interval
    assert options.housekeeper_lease == 3.0  # at least 3 s
    assert options.session_params() == {"statement_timeout": "1500ms"}
    assert options.statement_deadline > options.statement_timeout
    assert options.notify_channel == "kombu_pg.kombu_pg"


def test_connection_kwargs_bound_every_wait_unless_the_url_sets_them():
    options = Options.from_transport_options({"connect_timeout": 0.2, "keepalives_idle": 9, "tcp_user_timeout": 2})
    kwargs = options.connection_kwargs("postgresql://u@h/db?connect_timeout=3")
    assert "connect_timeout" not in kwargs  # the URL's own value wins
    assert kwargs["keepalives_idle"] == 9 and kwargs["keepalives_interval"] == 3
    assert kwargs["tcp_user_timeout"] == 2000
    assert "target_session_attrs" not in kwargs
    assert kwargs["fallback_application_name"].startswith("kombu-pg pool ")
    several = options.connection_kwargs("postgresql://u@h1,h2/db")
    assert several["target_session_attrs"] == "read-write"
    assert options.connection_kwargs("postgresql://u@h1,h2/db?target_session_attrs=any").get(
        "target_session_attrs") is None


def test_application_names_fit_postgres_and_stay_printable(monkeypatch):
    import kombu_pg.config as config

    monkeypatch.setattr(config, "_client_label", "wörker@" + "h" * 100)
    name = application_name("listen")
    assert name.startswith("kombu-pg listen w?rker@h") and name.endswith("]")
    assert len(name.encode()) <= 63 and name.isascii()
    assert len(client_name(10)) <= 10
