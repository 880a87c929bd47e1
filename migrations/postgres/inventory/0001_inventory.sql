-- Inventory participant: products and one reservation record per saga.

CREATE TABLE products (
    product_id  TEXT PRIMARY KEY,
    name        TEXT   NOT NULL DEFAULT '',
    price_cents BIGINT NOT NULL CHECK (price_cents >= 0),
    -- Units still available for new reservations.
    stock       BIGINT NOT NULL CHECK (stock >= 0),
    -- Units held by ACTIVE reservations.
    reserved    BIGINT NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One row per saga that ever reached the inventory: the idempotency record.
-- A TOMBSTONE is written by a Release that found no reservation; it makes a
-- late Reserve for the same saga fail and change nothing.
CREATE TABLE reservations (
    saga_id            TEXT PRIMARY KEY,
    reservation_id     TEXT,
    state              TEXT   NOT NULL CHECK (state IN ('ACTIVE', 'RELEASED', 'TOMBSTONE')),
    total_amount_cents BIGINT NOT NULL DEFAULT 0,
    created_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    released_at        TIMESTAMPTZ
);

CREATE TABLE reservation_items (
    saga_id     TEXT   NOT NULL REFERENCES reservations (saga_id),
    product_id  TEXT   NOT NULL REFERENCES products (product_id),
    quantity    BIGINT NOT NULL CHECK (quantity > 0),
    price_cents BIGINT NOT NULL CHECK (price_cents >= 0),
    PRIMARY KEY (saga_id, product_id)
);
