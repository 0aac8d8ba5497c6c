-- Orders per status, kept by statement triggers on `order_status`, so that the
-- `orderflow_orders` gauge (sampled every 3 s by every process) and `orderflow top`
-- read a dozen rows instead of counting every order: that count grew with the table,
-- to seconds of a core per sample with millions of orders. Each trigger folds the rows
-- its statement changed (transition tables), in the statement's transaction; a
-- rebuild's TRUNCATE zeroes the counts and its INSERT counts the rebuilt rows again.

CREATE TABLE IF NOT EXISTS order_status_counts (
    status text   PRIMARY KEY,
    orders bigint NOT NULL
);

-- Adds `changes[i]` orders to `statuses[i]`, in status order: concurrent writers take
-- the count rows' locks in one order.
CREATE FUNCTION order_status_counts_add(statuses text[], changes bigint[]) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO order_status_counts AS c (status, orders)
    SELECT status, change FROM unnest(statuses, changes) AS x(status, change)
     WHERE change <> 0
     ORDER BY status
    ON CONFLICT (status) DO UPDATE SET orders = c.orders + EXCLUDED.orders
$$;

CREATE FUNCTION order_status_count_changes() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- Each branch names only the transition tables its trigger declares.
    IF TG_OP = 'INSERT' THEN
        PERFORM order_status_counts_add(array_agg(status), array_agg(n))
           FROM (SELECT status, count(*) AS n FROM new_rows GROUP BY status) AS x;
    ELSIF TG_OP = 'DELETE' THEN
        PERFORM order_status_counts_add(array_agg(status), array_agg(-n))
           FROM (SELECT status, count(*) AS n FROM old_rows GROUP BY status) AS x;
    ELSIF TG_OP = 'UPDATE' THEN
        PERFORM order_status_counts_add(array_agg(status), array_agg(n))
           FROM (SELECT status, sum(change)::bigint AS n FROM (
                     SELECT status, 1 AS change FROM new_rows
                     UNION ALL
                     SELECT status, -1 FROM old_rows) AS moved
                  GROUP BY status) AS x;
    ELSE
        -- TRUNCATE
        UPDATE order_status_counts SET orders = 0 WHERE orders <> 0;
    END IF;
    RETURN NULL;
END
$$;

-- Writers wait until the counts below are taken and the triggers are in place.
LOCK TABLE order_status IN SHARE ROW EXCLUSIVE MODE;

CREATE TRIGGER order_status_counts_insert AFTER INSERT ON order_status
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION order_status_count_changes();
CREATE TRIGGER order_status_counts_update AFTER UPDATE ON order_status
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION order_status_count_changes();
CREATE TRIGGER order_status_counts_delete AFTER DELETE ON order_status
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION order_status_count_changes();
CREATE TRIGGER order_status_counts_truncate AFTER TRUNCATE ON order_status
    FOR EACH STATEMENT EXECUTE FUNCTION order_status_count_changes();

INSERT INTO order_status_counts (status, orders)
SELECT status, count(*) FROM order_status GROUP BY status
ON CONFLICT (status) DO UPDATE SET orders = EXCLUDED.orders;
