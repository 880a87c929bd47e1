-- no-transaction
-- Idempotency keys are scoped to the customer (see the PostgreSQL migration
-- of the same name). SQLite cannot drop a column's UNIQUE constraint, so the
-- table is rebuilt, the way SQLite documents it: foreign keys off (which
-- only works outside a transaction), the rebuild in a transaction of its
-- own, foreign keys on again.
PRAGMA foreign_keys = OFF;
BEGIN;

CREATE TABLE sagas_new (
    saga_id            TEXT PRIMARY KEY,
    idempotency_key    TEXT,
    customer_id        TEXT    NOT NULL,
    items              TEXT    NOT NULL,
    status             TEXT    NOT NULL,
    state              TEXT    NOT NULL,
    version            INTEGER NOT NULL DEFAULT 1,
    total_amount_cents INTEGER NOT NULL DEFAULT 0,
    failure_reason     TEXT,
    last_error         TEXT,
    current_step       TEXT,
    attempts           INTEGER NOT NULL DEFAULT 0,
    cancel_requested   INTEGER NOT NULL DEFAULT 0,
    next_attempt_at    REAL,
    lease_owner        TEXT,
    lease_expires_at   REAL,
    created_at         REAL    NOT NULL,
    updated_at         REAL    NOT NULL,
    progress_at        REAL    NOT NULL,
    finished_at        REAL,
    wake_requested_at  REAL
);
INSERT INTO sagas_new SELECT saga_id, idempotency_key, customer_id, items, status, state,
    version, total_amount_cents, failure_reason, last_error, current_step, attempts,
    cancel_requested, next_attempt_at, lease_owner, lease_expires_at, created_at, updated_at,
    progress_at, finished_at, wake_requested_at FROM sagas;
DROP TABLE sagas;
ALTER TABLE sagas_new RENAME TO sagas;

CREATE UNIQUE INDEX sagas_customer_key ON sagas (customer_id, idempotency_key);
CREATE INDEX sagas_active ON sagas (next_attempt_at)
    WHERE status NOT IN ('COMPLETED', 'FAILED', 'CANCELLED', 'NEEDS_ATTENTION');
CREATE INDEX sagas_by_status ON sagas (status, saga_id);
CREATE INDEX sagas_by_customer ON sagas (customer_id, saga_id);
CREATE INDEX sagas_woken ON sagas (lease_owner) WHERE wake_requested_at IS NOT NULL;
COMMIT;
PRAGMA foreign_keys = ON;
