"""Queues, exchanges and bindings (sql/queues.sql), the operator's statements on dead letters
and statistics (sql/dead_letters.sql), durable revokes and task lookup (sql/tasks.sql)."""
from __future__ import annotations

from ._base import Statements, Target
from .records import (Binding, DeadLetterCount, DeadLetterRow, DeadLetterSummary, Filter, Purged,
                      QueueCount, QueueStats, ReplayBatch, Revocation, Revoked, TaskMessage)


class OperatorStatements(Statements):
    # -- queues, exchanges, bindings ----------------------------------------------------------

    def declare_queue(self, target: Target, *, queue: str, durable: bool, auto_delete: bool,
                      expires_ms: float | None, message_ttl_ms: float | None, max_attempts: int | None,
                      backoff_base: float | None, backoff_cap: float | None) -> None:
        self._count(target, self.sql["declare_queue"], {
            "queue": queue, "durable": durable, "auto_delete": auto_delete, "expires_ms": expires_ms,
            "message_ttl_ms": message_ttl_ms, "max_attempts": max_attempts,
            "backoff_base": backoff_base, "backoff_cap": backoff_cap})

    def has_queue(self, target: Target, *, queue: str) -> bool:
        return self._value(target, self.sql["has_queue"], {"queue": queue})

    def delete_queue(self, target: Target, *, queue: str) -> int:
        """The queue, its bindings and its messages; how many messages went."""
        return self._count(target, self.sql["delete_queue"], {"queue": queue})

    def declare_exchange(self, target: Target, *, exchange: str, type: str, durable: bool,
                         auto_delete: bool) -> None:
        self._count(target, self.sql["declare_exchange"], {"exchange": exchange, "type": type,
                                                      "durable": durable, "auto_delete": auto_delete})

    def exchange_type(self, target: Target, *, exchange: str) -> str | None:
        row = self._row(target, self.sql["exchange_type"], {"exchange": exchange})
        return row[0] if row else None

    def delete_exchange(self, target: Target, *, exchange: str) -> None:
        self._count(target, self.sql["delete_exchange"], {"exchange": exchange})

    def bind(self, target: Target, *, exchange: str, routing_key: str, pattern: str, queue: str,
             channel: str) -> None:
        self._count(target, self.sql["bind"], {"exchange": exchange, "routing_key": routing_key,
                                          "pattern": pattern, "queue": queue, "channel": channel})

    def mark_via_notify(self, target: Target, *, queues: list[str]) -> None:
        self._count(target, self.sql["mark_via_notify"], {"queues": queues})

    def unbind(self, target: Target, *, exchange: str, routing_key: str, queue: str) -> None:
        self._count(target, self.sql["unbind"], {"exchange": exchange, "routing_key": routing_key,
                                            "queue": queue})

    def bindings_of_exchange(self, target: Target, *, exchange: str) -> list[Binding]:
        return [Binding(*row) for row in self._rows(target, self.sql["bindings_of_exchange"],
                                                    {"exchange": exchange})]

    def queue_counts(self, target: Target, *, queues: list[str]) -> list[QueueCount]:
        return [QueueCount(*row) for row in self._rows(target, self.sql["queue_counts"], {"queues": queues})]

    def purge_queues(self, target: Target, *, queues: list[str], delayed: bool, leased: bool) -> list[Purged]:
        return [Purged(*row) for row in self._rows(target, self.sql["purge_queues"], {
            "queues": queues, "delayed": delayed, "leased": leased})]

    # -- dead letters and statistics ----------------------------------------------------------

    def dlq_list(self, target: Target, filter: Filter, *, after: int, limit: int) -> list[DeadLetterSummary]:
        return [DeadLetterSummary(*row) for row in self._rows(
            target, self.sql["dlq_list"], dict(filter.params(), after=after, limit=limit))]

    def dlq_get(self, target: Target, *, id: int) -> DeadLetterRow | None:
        row = self._row(target, self.sql["dlq_get"], {"id": id})
        return DeadLetterRow(*row) if row else None

    def dlq_count(self, target: Target, filter: Filter) -> int:
        return self._value(target, self.sql["dlq_count"], filter.params())

    def dlq_replay_batch(self, target: Target, filter: Filter, *, after: int, limit: int,
                         channel: str) -> ReplayBatch:
        """Requeue the next ``limit`` matching dead letters with id > ``after``."""
        row = self._row(target, self.sql["dlq_replay_batch"],
                        dict(filter.params(), after=after, limit=limit, channel=channel))
        return ReplayBatch(*row[:2]) if row else ReplayBatch(0, None)

    def dlq_purge(self, target: Target, filter: Filter) -> int:
        return self._count(target, self.sql["dlq_purge"], filter.params())

    def stats_queues(self, target: Target) -> list[QueueStats]:
        return [QueueStats(name, ready, delayed, leased, float(age) if age is not None else None)
                for name, ready, delayed, leased, age in self._rows(target, self.sql["stats_queues"], {})]

    def stats_dead_letters(self, target: Target) -> list[DeadLetterCount]:
        return [DeadLetterCount(*row) for row in self._rows(target, self.sql["stats_dead_letters"], {})]

    # -- durable revokes and task lookup ------------------------------------------------------

    def revoke(self, target: Target, *, task_ids: list[str], expires_s: float, by: str,
               unmarked: bool) -> list[Revoked]:
        return [Revoked(*row) for row in self._rows(target, self.sql["revoke"], {
            "task_ids": task_ids, "expires_s": expires_s, "by": by, "unmarked": unmarked})]

    def task_messages(self, target: Target, *, task_id: str, default_max_attempts: int) -> list[TaskMessage]:
        return [TaskMessage(*row) for row in self._rows(target, self.sql["task_messages"], {
            "task_id": task_id, "default_max_attempts": default_max_attempts})]

    def task_dead_letters(self, target: Target, *, task_id: str) -> list[DeadLetterSummary]:
        return [DeadLetterSummary(*row) for row in self._rows(target, self.sql["task_dead_letters"],
                                                              {"task_id": task_id})]

    def task_revoked(self, target: Target, *, task_id: str) -> Revocation | None:
        row = self._row(target, self.sql["task_revoked"], {"task_id": task_id})
        return Revocation(*row) if row else None
