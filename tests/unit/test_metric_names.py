"""The Prometheus series kombu_pg exports: names, labels and values as a scraper reads them,
from given broker stats and event counts (the database side is tests/acceptance/test_metrics.py)."""
from __future__ import annotations

import pytest

pytest.importorskip("prometheus_client")
from prometheus_client import generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from kombu_pg import counters  # noqa: E402
from kombu_pg.metrics import KombuPgCollector, registry_for  # noqa: E402

STATS = {"queues": [{"queue": "celery", "ready": 3, "delayed": 1, "leased": 2, "oldest_ready_age_s": 4.5},
                    {"queue": "idle", "ready": 0, "delayed": 0, "leased": 0, "oldest_ready_age_s": None}],
         "dead_letters": [{"queue": "celery", "reason": "max_attempts", "count": 2}]}


class Fixed:
    """The collector's families for fixed stats and counts, without a database."""

    def __init__(self, counts: dict):
        self.counts = counts

    def collect(self):
        yield from KombuPgCollector._db_families(STATS, 5)
        yield from KombuPgCollector._counter_families(self.counts)


def scrape(counts: dict) -> dict[tuple, float]:
    text = generate_latest(registry_for(Fixed(counts))).decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_series_names_labels_and_values():
    samples = scrape({("acked", "celery"): 7, ("published", "celery"): 9})
    assert samples[("kombu_pg_queue_ready_messages", (("queue", "celery"),))] == 3
    assert samples[("kombu_pg_queue_delayed_messages", (("queue", "celery"),))] == 1
    assert samples[("kombu_pg_queue_leased_messages", (("queue", "celery"),))] == 2
    assert samples[("kombu_pg_queue_oldest_ready_age_seconds", (("queue", "celery"),))] == 4.5
    assert samples[("kombu_pg_queue_oldest_ready_age_seconds", (("queue", "idle"),))] == 0
    assert samples[("kombu_pg_dead_letters", (("queue", "celery"), ("reason", "max_attempts")))] == 2
    assert samples[("kombu_pg_dead_letters_replayed", ())] == 5
    assert samples[("kombu_pg_messages_acked_total", (("queue", "celery"),))] == 7
    assert samples[("kombu_pg_messages_published_total", (("queue", "celery"),))] == 9


def test_every_event_has_a_documented_counter_even_before_it_happens():
    text = generate_latest(registry_for(Fixed({}))).decode()
    for event in counters.EVENTS:
        assert f"# TYPE kombu_pg_messages_{event}_total counter" in text or \
               f"# TYPE kombu_pg_messages_{event} counter" in text, event
        assert f"# HELP kombu_pg_messages_{event}" in text
    assert "(this process)" not in text  # every known event has its own help text


def test_an_event_without_help_text_still_gets_its_series():
    samples = scrape({("teleported", "q"): 1})
    assert samples[("kombu_pg_messages_teleported_total", (("queue", "q"),))] == 1


def test_counters_count_per_event_and_queue():
    before = counters.snapshot()
    counters.add("acked", "unit-q")
    counters.add("acked", "unit-q", 4)
    counters.add("retried", "unit-q")
    after = counters.snapshot()
    assert after[("acked", "unit-q")] - before.get(("acked", "unit-q"), 0) == 5
    assert after[("retried", "unit-q")] - before.get(("retried", "unit-q"), 0) == 1
