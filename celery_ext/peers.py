"""Mingle and gossip: workers on this broker learn about each other.

Celery runs its Mingle bootstep (at start, ask the other workers for their revoked tasks and
logical clocks) and its Gossip bootstep (follow the other workers' online, offline and heartbeat
events; elections) only for the transports whose ``driver_type`` it lists. Both travel over
fanout and topic exchanges, which this transport routes in the database across processes, so
both work here and are turned on. ``--without-mingle`` and ``--without-gossip`` still turn them
off: Celery checks the flags before the transport.
"""
from __future__ import annotations

from celery.worker.consumer.gossip import Gossip
from celery.worker.consumer.mingle import Mingle

from kombu_pg.transport import Transport


def install() -> None:
    for step in (Mingle, Gossip):
        if Transport.driver_type not in step.compatible_transports:
            step.compatible_transports = {*step.compatible_transports, Transport.driver_type}
