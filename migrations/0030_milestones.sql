-- Workflow 2's fraud check counts a customer's recent orders: OrderPlaced events by
-- customer_id (services::commands::recent_orders). A partial expression index keeps
-- that one indexed lookup however long the log grows.
CREATE INDEX IF NOT EXISTS events_order_placed_customer
    ON events ((payload->>'customer_id'), recorded_at)
    WHERE event_type = 'OrderPlaced';

-- Read model: when each milestone of an order was reached (projector::milestones).
-- reached_at is the recorded_at of the event that reached it, so a replay gives the
-- same rows. Idempotent DDL: the projector runs it again before a replay, so a
-- dropped table comes back.
CREATE TABLE IF NOT EXISTS order_milestones (
    order_id        uuid        NOT NULL,
    milestone       text        NOT NULL,
    reached_at      timestamptz NOT NULL,
    global_position bigint      NOT NULL,
    PRIMARY KEY (order_id, milestone)
);
