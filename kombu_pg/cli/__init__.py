"""The ``kombu-pg`` command line (also mounted as ``celery -A app pg …``, see celery_ext.cli).

One module per family of commands; :mod:`.common` holds what they share (the broker target,
durations, one-line errors). Each command is defined once and added to both groups.
"""
from __future__ import annotations

import click

from . import beat, dlq, metrics, migrate, queues, web
from .common import AppBroker, Target, target_options, use_app_broker

__all__ = ["COMMANDS", "AppBroker", "Target", "main", "use_app_broker"]


@click.group(help="Manage a kombu-pg PostgreSQL broker.")
@target_options
def main() -> None:
    pass


COMMANDS: tuple[click.Command, ...] = (
    migrate.migrate, migrate.grants_command, queues.stats, dlq.dlq, metrics.metrics_command,
    queues.task_command, queues.revoke_command, queues.purge_command, beat.beat, web.web)
for _command in COMMANDS:
    main.add_command(_command)
