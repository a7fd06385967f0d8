"""Mingle and gossip: workers on this broker learn about each other.

Celery runs its Mingle bootstep (at start, ask the other workers for their revoked tasks and
logical clocks) and its Gossip bootstep (follow the other workers' online, offline and heartbeat
events; elections) only for the transports whose ``driver_type`` it lists. Both travel over
fanout and topic exchanges, which this transport routes in the database across processes, so
both work here. Mingle costs one broadcast and the replies when a worker starts. Gossip costs
every worker a heartbeat publish per heartbeat interval, which every other worker receives: its
gossip queue takes its messages as notifications, not rows (kombu_pg/broadcasts.py), and the
heartbeat interval on this broker is 10 s rather than Celery's 2 s (each publish is a server
transaction: 2 s alone would be 0.5 transactions/s per idle worker). Both are on, as on
RabbitMQ; ``--without-mingle``, ``--without-gossip`` (or ``kombu_pg_gossip = False`` in the
app's configuration) and ``--heartbeat-interval`` still decide: Celery checks the flags
before the transport.
"""
from __future__ import annotations

from celery.worker.consumer.gossip import Gossip
from celery.worker.consumer.heart import Heart
from celery.worker.consumer.mingle import Mingle

from kombu_pg.transport import Transport

from . import patches

#: The app setting that turns gossip off for the app's workers on this broker (True by default).
GOSSIP_SETTING = "kombu_pg_gossip"
#: Seconds between a worker's heartbeat events on this broker unless --heartbeat-interval says.
#: Receivers judge a worker lost after twice the interval its heartbeats carry (Celery's
#: ``freq``): gossip, ``celery events`` and Flower adapt on their own.
HEARTBEAT_INTERVAL = 10.0


def on_this_broker(app) -> bool:
    with app.connection_for_read() as conn:
        return conn.transport.driver_type == Transport.driver_type


def enable_mingle_and_gossip() -> None:
    """Extend Mingle.compatible_transports, wrap Gossip.compatible_transport (celery_ext.patches)."""
    if Transport.driver_type not in Mingle.compatible_transports:
        Mingle.compatible_transports = {*Mingle.compatible_transports, Transport.driver_type}
    if patches.is_ours(Gossip.compatible_transport):
        return
    celery_check = Gossip.compatible_transport

    def compatible_transport(self, app):
        if celery_check(self, app):
            return True
        return on_this_broker(app) and bool(app.conf.get(GOSSIP_SETTING, True))

    patches.mark(compatible_transport)
    Gossip.compatible_transport = compatible_transport


def space_heartbeats() -> None:
    """Wrap Heart.__init__ (celery_ext.patches): HEARTBEAT_INTERVAL unless the worker was given one."""
    if patches.is_ours(Heart.__init__):
        return
    celery_init = Heart.__init__

    def __init__(self, c, without_heartbeat=False, heartbeat_interval=None, **kwargs):
        if heartbeat_interval is None and on_this_broker(c.app):
            heartbeat_interval = HEARTBEAT_INTERVAL
        celery_init(self, c, without_heartbeat=without_heartbeat,
                    heartbeat_interval=heartbeat_interval, **kwargs)

    patches.mark(__init__)
    Heart.__init__ = __init__
