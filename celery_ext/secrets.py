"""Broker passwords stay out of what Celery reports.

The transport keeps the whole URL as Kombu's hostname (libpq parameters such as ``?sslmode=``
and multi-host lists must reach libpq intact), and transport options may hold URLs
(``listen_url``). Celery strips only the ``password`` key of the broker connection's info from
``celery inspect stats``, and its censored settings (``celery report``, ``conf.humanize()``,
``celery inspect conf``) mask the broker URL and keys whose names look secret, not URLs in
other values (see ``_autoload.censor_urls`` for those). The connections themselves are left as
they are, so that reconnects and ``Connection.clone()`` (pidbox, events, producers) keep their
credentials.
"""
from __future__ import annotations

from celery import bootsteps
from celery.worker.consumer.connection import Connection

from kombu_pg.config import masked

#: Celery's own mask in censored settings.
MASK = "*" * 8


class BrokerInfo(bootsteps.StartStopStep):
    """The broker entry of ``celery inspect stats`` (Celery's Connection step), masked. Steps
    report in start order, and this one starts after Connection: its entry wins."""

    requires = (Connection,)

    def info(self, c):
        return masked(Connection.info(self, c), MASK)  # {"broker": {...}}, as Celery's

