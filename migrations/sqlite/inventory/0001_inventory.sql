-- Inventory participant (SQLite dialect): products and one reservation
-- record per saga. Same tables and checks as migrations/postgres/inventory;
-- timestamps are ISO 8601 UTC text.

CREATE TABLE products (
    product_id  TEXT PRIMARY KEY NOT NULL,
    name        TEXT    NOT NULL DEFAULT '',
    price_cents INTEGER NOT NULL CHECK (price_cents >= 0),
    -- Units still available for new reservations.
    stock       INTEGER NOT NULL CHECK (stock >= 0),
    -- Units held by ACTIVE reservations.
    reserved    INTEGER NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    updated_at  TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

-- One row per saga that ever reached the inventory: the idempotency record.
-- A TOMBSTONE is written by a Release that found no reservation; it makes a
-- late Reserve for the same saga fail and change nothing.
CREATE TABLE reservations (
    saga_id            TEXT PRIMARY KEY NOT NULL,
    reservation_id     TEXT,
    state              TEXT    NOT NULL CHECK (state IN ('ACTIVE', 'RELEASED', 'TOMBSTONE')),
    total_amount_cents INTEGER NOT NULL DEFAULT 0,
    created_at         TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    released_at        TEXT
);

CREATE TABLE reservation_items (
    saga_id     TEXT    NOT NULL REFERENCES reservations (saga_id),
    product_id  TEXT    NOT NULL REFERENCES products (product_id),
    quantity    INTEGER NOT NULL CHECK (quantity > 0),
    price_cents INTEGER NOT NULL CHECK (price_cents >= 0),
    PRIMARY KEY (saga_id, product_id)
);
