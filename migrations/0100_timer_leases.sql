-- A claimed timer is leased instead of locked. The scheduler claims due rows in one
-- short statement and fires them outside any transaction, so that no transaction stays
-- open while the aggregates decide: an open transaction holds back the log's gap-safe
-- horizon, and with it every follower of the log. A scheduler that dies while firing
-- leaves a lease that runs out; the timer is then claimed again, and firing it twice
-- appends nothing new (event ids derive from the timer's id).
ALTER TABLE timers ADD COLUMN IF NOT EXISTS leased_until timestamptz;
