-- Tables of the services that are not read models of the log.

-- The payment gateway simulator's own ledger: what a real gateway keeps on its side.
-- One row per idempotency key; the first outcome wins and is returned on repeats.
CREATE TABLE IF NOT EXISTS gateway_ledger (
    idempotency_key text PRIMARY KEY,
    kind            text        NOT NULL,   -- capture | refund
    outcome         text        NOT NULL,   -- captured | declined | refunded
    reference       text        NOT NULL,
    amount_cents    bigint      NOT NULL,   -- money moved: + captured, - refunded
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- Customer notifications: one row per customer-facing event (idempotent by event id).
CREATE TABLE IF NOT EXISTS notifications (
    event_id    uuid PRIMARY KEY,
    order_id    uuid        NOT NULL,
    customer_id text,
    kind        text        NOT NULL,
    message     text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS notifications_order_idx ON notifications (order_id, created_at);
