"""The advisory locks kombu-pg takes, in one place so that no two can collide.

Each is the two-int key ``(namespace, hashtext(schema))``: one lock per broker schema, so two
schemas of one database never wait on each other. The namespaces are arbitrary constants
(ASCII tags), chosen to stay clear of applications' own single-bigint advisory locks.
"""

#: Serializes migrations of a schema (kombu_pg/migrate.py): the first session applies them,
#: the others wait (bounded by migrate_lock_timeout) and then find nothing to do.
MIGRATIONS = 0x6B706D67  # "kpmg"

#: Serializes beat's sync of configured entries into beat_entries (kombu_pg/store/beat.py), so
#: that two beats starting together do not both insert or delete the same entries.
BEAT_CONFIG_SYNC = 0x6B706762  # "kpgb"
