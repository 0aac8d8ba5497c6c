-- Parked orders (docs/adr/0005-parking-and-per-order-ordering.md): a message about an
-- order whose in-process retries ran out is set aside here instead of going through the
-- delay tiers to the dead-letter queue, and the order's later messages on the same
-- queue wait behind it, in arrival order, until a worker replays them (automatically
-- on a schedule, or after `orderflow resume`). Not a read model: this is the workers'
-- own durable state, like `timers` is the scheduler's.

-- One row per (queue, order) that is parked. Its presence is what makes the order's
-- later messages on that queue wait; the worker that drains it deletes it last.
CREATE TABLE IF NOT EXISTS parked_orders (
    queue         text        NOT NULL,
    order_key     text        NOT NULL,            -- 'order:<uuid>'
    order_id      uuid        NOT NULL,
    worker        text        NOT NULL,
    error         text        NOT NULL,            -- the last failure
    attempts      int         NOT NULL DEFAULT 0,  -- handler attempts so far, in total
    rounds        int         NOT NULL DEFAULT 0,  -- automatic replays that failed
    parked_at     timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    retry_at      timestamptz,                     -- next replay; NULL: waits for an operator
    resumed_at    timestamptz,                     -- last `orderflow resume`
    claimed_until timestamptz,                     -- a worker is replaying it until then
    PRIMARY KEY (queue, order_key)
);
CREATE INDEX IF NOT EXISTS parked_orders_due_idx ON parked_orders (queue, retry_at)
    WHERE retry_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS parked_orders_order_idx ON parked_orders (order_id);

-- Every message that was parked, in arrival order (seq), with what is needed to hand it
-- to the handler again. Kept after it was replayed (replayed_at) as the order's history
-- for `orderflow order timeline`. (queue, message_id) is unique: parking the same
-- delivery twice (a lost ack, a redelivery) keeps one row.
CREATE TABLE IF NOT EXISTS parked_messages (
    seq          bigserial   PRIMARY KEY,
    queue        text        NOT NULL,
    order_key    text        NOT NULL,
    order_id     uuid        NOT NULL,
    message_id   text        NOT NULL,
    exchange     text        NOT NULL,
    routing_key  text        NOT NULL,
    body         bytea       NOT NULL,
    properties   jsonb       NOT NULL,             -- correlation id, type, headers, ...
    error        text        NOT NULL,             -- why it was parked
    attempts     int         NOT NULL DEFAULT 0,
    parked_at    timestamptz NOT NULL DEFAULT now(),
    replayed_at  timestamptz,
    UNIQUE (queue, message_id)
);
CREATE INDEX IF NOT EXISTS parked_messages_waiting_idx
    ON parked_messages (queue, order_key, seq) WHERE replayed_at IS NULL;
CREATE INDEX IF NOT EXISTS parked_messages_order_idx ON parked_messages (order_id, seq);

-- `orderflow order timeline` finds the stock events an order caused by their payload's
-- order id; only stock streams are indexed (the order's own streams are named by it).
CREATE INDEX IF NOT EXISTS events_stock_order_idx ON events ((payload->>'order_id'))
    WHERE stream_name LIKE 'stock-%';
