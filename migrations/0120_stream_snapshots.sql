-- Snapshots of long streams' folded states (services::snapshots): a cache, never the
-- truth. A worker that starts, or forgets a stream, folds it from its last snapshot and
-- the events after it instead of from its first event; a popular SKU's stock stream
-- grows with every order. One row per stream, replaced as the stream moves on. A row of
-- a format the running build does not write is ignored, and so is one whose event at its
-- version is not in the log under `event_id` (a log restored to an earlier point, with
-- newer snapshots left beside it); deleting rows is always safe.
CREATE TABLE IF NOT EXISTS stream_snapshots (
    stream_name text        PRIMARY KEY,
    format      text        NOT NULL,
    version     bigint      NOT NULL CHECK (version >= 0),
    -- The event at `version`: the snapshot folds this history, not another one.
    event_id    uuid        NOT NULL,
    state       jsonb       NOT NULL,
    taken_at    timestamptz NOT NULL DEFAULT now()
);
