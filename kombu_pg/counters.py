"""In-process event counters (delivered, acked, retried, ...), per queue.

Cheap enough for the hot path (a lock and a dict update); read by the metrics exporter. Each
process counts what it did itself; a prefork worker's exporter runs in the main process, which
delivers and acks every message.
"""
from __future__ import annotations

import collections
import os
import threading

EVENTS = ("published", "delivered", "acked", "released", "requeued", "retried",
          "dead_lettered", "replayed", "duplicates_dropped")

_counts: collections.Counter = collections.Counter()
_lock = threading.Lock()


def _new_lock_in_child() -> None:
    # A thread of the parent (acker, metrics server) may hold the lock at fork time: the child
    # would inherit it locked, and its first add() would block forever.
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_in_child)


def add(event: str, queue: str, n: int = 1) -> None:
    with _lock:
        _counts[(event, queue)] += n


def snapshot() -> dict[tuple[str, str], int]:
    with _lock:
        return dict(_counts)
