-- Deduplication: a message published with a unique key is dropped (or replaces the waiting one)
-- while another message with the same key in the same queue is waiting or running. The key is
-- free again once that message is acked or dead-lettered (its row is gone).
ALTER TABLE {schema}.messages ADD COLUMN IF NOT EXISTS unique_key text;
CREATE UNIQUE INDEX IF NOT EXISTS messages_unique_key_idx
    ON {schema}.messages (queue, unique_key) WHERE unique_key IS NOT NULL;
