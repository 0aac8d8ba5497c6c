-- The event log: one append-only table for every stream (docs/ARCHITECTURE.md, "The event log").

CREATE TABLE events (
    global_position bigserial   PRIMARY KEY,
    -- The appending transaction's id: followers read in (transaction_id, global_position)
    -- order and only below the oldest transaction still running, so an event whose
    -- transaction commits late is never skipped (see the gap-safe read_all).
    transaction_id  bigint      NOT NULL DEFAULT (pg_current_xact_id()::text::bigint),
    stream_name     text        NOT NULL,
    stream_version  bigint      NOT NULL,
    event_id        uuid        NOT NULL,
    event_type      text        NOT NULL,
    schema_version  int         NOT NULL,
    payload         jsonb       NOT NULL,
    metadata        jsonb       NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    -- Named, because the store tells a concurrency conflict (this key) from a duplicate
    -- event (the next one) by the constraint name of SQLSTATE 23505.
    CONSTRAINT events_stream_version_key UNIQUE (stream_name, stream_version),
    CONSTRAINT events_event_id_key UNIQUE (event_id),
    CONSTRAINT events_stream_version_not_negative CHECK (stream_version >= 0)
);

-- The followers' reading order.
CREATE INDEX events_transaction_position_idx ON events (transaction_id, global_position);

-- Append-only for every role. Privileges do not bind the table's owner or a superuser,
-- and an ordinary trigger is skipped under session_replication_role = replica; a trigger
-- that is ENABLE ALWAYS fires in every case.
CREATE FUNCTION events_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the events table is append-only: % is refused', TG_OP
        USING ERRCODE = 'restrict_violation',
              HINT = 'events are never updated or deleted; append a compensating event';
END;
$$;

CREATE TRIGGER events_refuse_update_delete
    BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_refuse_change();

CREATE TRIGGER events_refuse_truncate
    BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_refuse_change();

ALTER TABLE events ENABLE ALWAYS TRIGGER events_refuse_update_delete;
ALTER TABLE events ENABLE ALWAYS TRIGGER events_refuse_truncate;

-- Followers' positions (projector, relay, timers). A projector writes its rows and its
-- checkpoint in one transaction.
CREATE TABLE checkpoints (
    name            text        PRIMARY KEY,
    transaction_id  bigint      NOT NULL,
    global_position bigint      NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
