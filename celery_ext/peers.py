"""Mingle and gossip: workers on this broker learn about each other.

Celery runs its Mingle bootstep (at start, ask the other workers for their revoked tasks and
logical clocks) and its Gossip bootstep (follow the other workers' online, offline and heartbeat
events; elections) only for the transports whose ``driver_type`` it lists. Both travel over
fanout and topic exchanges, which this transport routes in the database across processes, so
both work here. Mingle costs one broadcast and the replies when a worker starts: it is on.
Gossip costs every idle worker a heartbeat published every 2 s and its gossip queue claimed
every second (1.6 server transactions/s per idle worker, against 0.1 without): it is on only
for apps that set ``kombu_pg_gossip = True``. ``--without-mingle`` and ``--without-gossip``
still turn them off: Celery checks the flags before the transport.
"""
from __future__ import annotations

from celery.worker.consumer.gossip import Gossip
from celery.worker.consumer.mingle import Mingle

from kombu_pg.transport import Transport

#: The app setting that turns gossip on for workers on this broker.
GOSSIP_SETTING = "kombu_pg_gossip"


def enable_mingle_and_gossip() -> None:
    """Extend Mingle.compatible_transports, wrap Gossip.compatible_transport (celery_ext.patches)."""
    if Transport.driver_type not in Mingle.compatible_transports:
        Mingle.compatible_transports = {*Mingle.compatible_transports, Transport.driver_type}
    if getattr(Gossip.compatible_transport, "_kombu_pg", False):
        return
    celery_check = Gossip.compatible_transport

    def compatible_transport(self, app):
        if celery_check(self, app):
            return True
        with app.connection_for_read() as conn:
            ours = conn.transport.driver_type == Transport.driver_type
        return ours and bool(app.conf.get(GOSSIP_SETTING, False))

    compatible_transport._kombu_pg = True
    Gossip.compatible_transport = compatible_transport
