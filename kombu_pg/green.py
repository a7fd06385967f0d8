"""Cooperative waits for the server under eventlet.

psycopg waits for the server in C (``poll()``) unless it finds gevent's monkey patching; that
wait is out of eventlet's reach: every statement would stop all green threads until it
returns, and the watchdog (a green thread then) could not interrupt one that hangs. Under
eventlet, psycopg waits through ``select()`` instead, which eventlet patched.
"""
from __future__ import annotations

import sys


def cooperate() -> None:
    patcher = sys.modules.get("eventlet.patcher")
    if patcher is None or not patcher.is_monkey_patched("select"):
        return
    from psycopg import waiting

    waiting.wait = waiting.wait_select
