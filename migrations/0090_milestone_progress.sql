-- projector::milestones (issue 6): what the `reserved` and `paid` milestones need to
-- know of an order stream before an event (the order's status and its lines'
-- statuses), as of the stream's last event the projection applied. A page reads these
-- rows instead of folding every order stream it touches again from `events`. Not a
-- read model of the contract: the projection's own state, emptied and rebuilt with
-- `order_milestones` by a replay. Idempotent DDL: the projector runs it again before a
-- replay, so a dropped table comes back.
CREATE TABLE IF NOT EXISTS order_milestone_progress (
    stream_name text   PRIMARY KEY,
    version     bigint NOT NULL,  -- the stream_version folded up to, every one before it too
    status      text   NOT NULL,  -- OrderState.status (projector::milestones::status_code)
    lines       text   NOT NULL   -- OrderState.lines, one letter per line (line_code)
);
