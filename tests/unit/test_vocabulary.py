"""Names the code shares: dead-letter reasons, advisory-lock keys, our delivery info."""
import re
from pathlib import Path

from kombu_pg import lock_keys, messages
from kombu_pg.reasons import REASONS, Reason

SQL = Path(__file__).resolve().parents[2] / "kombu_pg" / "sql"


def test_every_reason_written_by_a_statement_is_a_known_reason():
    spelled = {m.group(1) for path in SQL.glob("*.sql")
               for m in re.finditer(r"'(\w+)'\s+AS\s+reason", path.read_text(), re.IGNORECASE)}
    assert spelled, "no statement writes a reason: the pattern no longer matches the SQL"
    assert spelled <= set(REASONS), spelled - set(REASONS)


def test_a_reason_is_the_string_it_stands_for():
    # psycopg dumps an Enum by its name, JSON and click by its value: both must be the reason.
    assert all(reason.name == reason.value == str(reason) for reason in Reason)
    assert REASONS == tuple(reason.value for reason in Reason) and all(type(r) is str for r in REASONS)


def test_advisory_lock_namespaces_are_distinct_int4():
    keys = {name: value for name, value in vars(lock_keys).items() if name.isupper()}
    assert len(set(keys.values())) == len(keys) >= 2
    assert all(-2**31 <= value < 2**31 for value in keys.values())  # the ::int of the lock call


def test_delivery_info_of_our_message_and_of_another_brokers():
    ours = {"routing_key": "rk", messages.DELIVERY_KEY: {"id": 7, "token": "t", "queue": "q"}}
    assert messages.delivery(ours)["id"] == 7 and messages.queue_of(ours) == "q"
    assert messages.delivery({"routing_key": "rk"}) == {} and messages.queue_of({"routing_key": "rk"}) == "rk"
    assert messages.delivery(None) == {} and messages.queue_of(None) == ""
