"""The statements' names, one per block of kombu_pg/sql/*.sql (fragments aside), as a type:
the store indexes the rendered statements by these literals, so a type checker knows the set
and a misspelt name fails before anything runs. tests/unit/test_statement_names.py keeps this
list and the .sql files in step."""
from __future__ import annotations

from typing import Literal, get_args

StatementName = Literal[
    # beat.sql
    "beat_session_setup", "beat_tables_exist", "beat_entries", "beat_bump_revision",
    "beat_insert_entry", "beat_replace_entry", "beat_sync_lock", "beat_upsert_config_entry",
    "beat_delete_stale_config", "beat_set_paused", "beat_delete_entry", "beat_leader", "beat_lead",
    "beat_resign", "beat_advance", "beat_record_tick", "beat_set_tick_task", "beat_prune_ticks",
    # console.sql
    "console_rates", "console_minute", "console_lease_holders", "console_leases",
    "console_dead_letter_tasks",
    # dead_letters.sql
    "dlq_list", "dlq_get", "dlq_count", "dlq_replay_batch", "dlq_purge", "stats_queues",
    "stats_dead_letters",
    # housekeeping.sql
    "housekeeper_renew", "housekeeper_resign", "reap", "wake_queues", "sweep_expired_queues",
    "sweep_revoked", "revoked_to_mark", "sweep_expired_messages", "sweep_expired_tasks",
    "vacuum_due", "vacuum_messages",
    # messages.sql
    "publish_direct", "publish_routed", "claim", "claim_no_ack", "ack", "release", "renew",
    "requeue", "fail", "dead_letter", "dead_letter_taken", "size", "purge", "poll", "next_due",
    "scheduled",
    # migrate.sql
    "migrations_table_exists", "applied_migrations", "migrate_lock", "migrate_lock_taken",
    "migrate_lock_holders", "create_schema", "create_migrations_table", "record_migration",
    # queues.sql
    "declare_queue", "has_queue", "delete_queue", "declare_exchange", "exchange_type",
    "delete_exchange", "bind", "mark_via_notify", "unbind", "bindings_of_exchange", "queue_counts", "purge_queues",
    # sessions.sql
    "session_setup", "server_backend_pid", "listen",
    # stats.sql
    "stats_flush",
    # tasks.sql
    "revoke", "task_messages", "task_dead_letters", "task_revoked",
]

#: Every statement name, in the order of the files.
STATEMENT_NAMES: tuple[StatementName, ...] = get_args(StatementName)
