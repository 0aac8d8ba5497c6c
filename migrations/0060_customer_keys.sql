-- Issue 7, data protection (docs/adr/0004-crypto-shredding.md): per-customer keys that
-- seal the customer's personal data in events. Kept outside the log on purpose: the log
-- is append-only, this table is not. Forgetting a customer deletes the key row
-- (`orderflow forget-customer`), which makes every sealed copy unreadable.

-- The customer's current key. key_id is what a sealed field names (so a customer
-- forgotten and then ordering again gets a new key_id, and nothing sealed under the old
-- key is revived). Not a read model: it cannot be rebuilt from the log, by design.
CREATE TABLE IF NOT EXISTS customer_keys (
    customer_id text        PRIMARY KEY,
    key_id      uuid        NOT NULL UNIQUE,
    key         bytea       NOT NULL CHECK (octet_length(key) = 32),
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- A tombstone per destroyed key: who was forgotten and when (never the key).
CREATE TABLE IF NOT EXISTS forgotten_customers (
    key_id       uuid        PRIMARY KEY,
    customer_id  text        NOT NULL,
    forgotten_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS forgotten_customers_customer_idx
    ON forgotten_customers (customer_id);
