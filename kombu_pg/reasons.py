"""Why a message was dead-lettered: the values of ``dead_letters.reason``.

Members are named as their values, so a member is the string it stands for wherever it goes
(SQL parameters, JSON, click choices). Statements that write a reason themselves (the claim's
delivery cap, the reaper, the sweep of expired tasks) spell it in SQL; a unit test checks those
spellings against this list.
"""
from __future__ import annotations

import enum


class Reason(enum.StrEnum):
    max_attempts = enum.auto()   # its last allowed delivery failed (raised, worker lost, requeued)
    lease_expired = enum.auto()  # the reaper found its lease expired at the delivery cap
    max_retries = enum.auto()    # Celery's own retries (self.retry, autoretry_for) gave up
    rejected = enum.auto()       # Reject(requeue=False) or a consumer's reject without requeue
    unregistered = enum.auto()   # no task of that name in the worker
    undecodable = enum.auto()    # not a valid Kombu message or Celery task message
    expired = enum.auto()        # a task past its expiry that no worker took within the grace


REASONS: tuple[str, ...] = tuple(reason.value for reason in Reason)
