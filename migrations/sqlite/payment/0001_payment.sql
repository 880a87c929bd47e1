-- Payment participant (SQLite dialect): accounts and one charge record per
-- saga. Same tables and checks as migrations/postgres/payment; timestamps
-- are ISO 8601 UTC text.

CREATE TABLE accounts (
    customer_id   TEXT PRIMARY KEY NOT NULL,
    balance_cents INTEGER NOT NULL CHECK (balance_cents >= 0),
    updated_at    TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

-- One row per saga that ever reached the payment service: the idempotency
-- record. A TOMBSTONE is written by a Refund that found no charge; it makes a
-- late Charge for the same saga fail and change nothing.
CREATE TABLE charges (
    saga_id      TEXT PRIMARY KEY NOT NULL,
    charge_id    TEXT,
    customer_id  TEXT,
    amount_cents INTEGER NOT NULL DEFAULT 0 CHECK (amount_cents >= 0),
    state        TEXT    NOT NULL CHECK (state IN ('CHARGED', 'REFUNDED', 'TOMBSTONE')),
    created_at   TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    refunded_at  TEXT
);
