"""Benchmarks of kombu-pg against other Kombu brokers: run with ``python -m bench.run``."""
