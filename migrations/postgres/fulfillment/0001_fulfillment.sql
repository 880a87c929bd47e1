-- Fulfillment participant: one shipment record per saga.

-- A TOMBSTONE is written by a CancelShipment that found no shipment; it makes
-- a late Ship for the same saga fail and change nothing.
CREATE TABLE shipments (
    saga_id      TEXT PRIMARY KEY,
    shipment_id  TEXT,
    state        TEXT NOT NULL CHECK (state IN ('SHIPPED', 'CANCELLED', 'TOMBSTONE')),
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    cancelled_at TIMESTAMPTZ
);

CREATE TABLE shipment_items (
    saga_id    TEXT   NOT NULL REFERENCES shipments (saga_id),
    product_id TEXT   NOT NULL,
    quantity   BIGINT NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (saga_id, product_id)
);
