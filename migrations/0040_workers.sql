-- Issue 7: the worker registry and the read-your-writes token.

-- One row per running `orderflow run` process (services::registry): it inserts its row
-- at start, refreshes last_heartbeat every heartbeat_interval_ms and deletes the row on a
-- clean shutdown. A row silent for more than three intervals belongs to a process that
-- is gone (killed, crashed, cut off). Not a read model: nothing here is rebuilt from the
-- log.
CREATE TABLE IF NOT EXISTS workers (
    id                    uuid        PRIMARY KEY,
    host                  text        NOT NULL,
    pid                   integer     NOT NULL,
    workers               text[]      NOT NULL,
    version               text        NOT NULL,
    http_addr             text,
    heartbeat_interval_ms bigint      NOT NULL CHECK (heartbeat_interval_ms > 0),
    started_at            timestamptz NOT NULL DEFAULT now(),
    last_heartbeat        timestamptz NOT NULL DEFAULT now()
);

-- Read-your-writes: a client that published a command waits for the events it caused,
-- found by the command's message_id in their metadata (docs/OPERATIONS.md).
CREATE INDEX IF NOT EXISTS events_causation_idx ON events ((metadata->>'causation_id'));
