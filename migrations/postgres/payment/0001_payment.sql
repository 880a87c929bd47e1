-- Payment participant: accounts and one charge record per saga.

CREATE TABLE accounts (
    customer_id   TEXT PRIMARY KEY,
    balance_cents BIGINT NOT NULL CHECK (balance_cents >= 0),
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One row per saga that ever reached the payment service: the idempotency
-- record. A TOMBSTONE is written by a Refund that found no charge; it makes a
-- late Charge for the same saga fail and change nothing.
CREATE TABLE charges (
    saga_id      TEXT PRIMARY KEY,
    charge_id    TEXT,
    customer_id  TEXT,
    amount_cents BIGINT NOT NULL DEFAULT 0 CHECK (amount_cents >= 0),
    state        TEXT   NOT NULL CHECK (state IN ('CHARGED', 'REFUNDED', 'TOMBSTONE')),
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    refunded_at  TIMESTAMPTZ
);
