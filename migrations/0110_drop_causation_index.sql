-- The read-your-writes lookup (`--wait`, docs/OPERATIONS.md) finds a command's events on
-- its order's stream, through the (stream_name, stream_version) key, and filters them by
-- causation there. The expression index on metadata->>'causation_id' that 0040 added for
-- it was paid by every append: a random 36-character key per event, the largest index on
-- the log and about a quarter of an INSERT's cost into it.
DROP INDEX IF EXISTS events_causation_idx;
