-- Fulfillment participant (SQLite dialect): one shipment record per saga.
-- Same tables and checks as migrations/postgres/fulfillment; timestamps are
-- ISO 8601 UTC text.

-- A TOMBSTONE is written by a CancelShipment that found no shipment; it makes
-- a late Ship for the same saga fail and change nothing.
CREATE TABLE shipments (
    saga_id      TEXT PRIMARY KEY NOT NULL,
    shipment_id  TEXT,
    state        TEXT NOT NULL CHECK (state IN ('SHIPPED', 'CANCELLED', 'TOMBSTONE')),
    created_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    cancelled_at TEXT
);

CREATE TABLE shipment_items (
    saga_id    TEXT    NOT NULL REFERENCES shipments (saga_id),
    product_id TEXT    NOT NULL,
    quantity   INTEGER NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (saga_id, product_id)
);
