-- Read models: every row here can be dropped and rebuilt from `events`
-- (`orderflow replay`). Written only by the projector.

CREATE TABLE IF NOT EXISTS order_status (
    order_id             uuid PRIMARY KEY,
    customer_id          text        NOT NULL,
    status               text        NOT NULL,
    cancel_reason        text,
    total_cents          bigint      NOT NULL,
    currency             text        NOT NULL,
    item_count           int         NOT NULL,
    placed_at            timestamptz NOT NULL,
    updated_at           timestamptz NOT NULL,
    last_global_position bigint      NOT NULL
);
CREATE INDEX IF NOT EXISTS order_status_status_idx ON order_status (status, placed_at);
CREATE INDEX IF NOT EXISTS order_status_customer_idx ON order_status (customer_id);

CREATE TABLE IF NOT EXISTS stock_levels (
    sku      text PRIMARY KEY,
    on_hand  bigint NOT NULL,
    reserved bigint NOT NULL
);

-- Durable timers, derived from the log: an event that schedules something inserts a
-- row, the event that makes it moot deletes it. The scheduler claims due rows with
-- FOR UPDATE SKIP LOCKED, so several processes can run it.
CREATE TABLE IF NOT EXISTS timers (
    timer_id    uuid PRIMARY KEY,
    kind        text        NOT NULL,
    order_id    uuid        NOT NULL,
    due_at      timestamptz NOT NULL,
    scheduled_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS timers_due_idx ON timers (due_at);
CREATE INDEX IF NOT EXISTS timers_order_idx ON timers (order_id, kind);
