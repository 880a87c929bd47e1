-- Orchestrator: one row per saga (the order and its state machine) and an
-- append-only journal of every attempt of every step.

CREATE TABLE sagas (
    saga_id          TEXT PRIMARY KEY,          -- the order id; time-ordered
    idempotency_key  TEXT UNIQUE,
    customer_id      TEXT   NOT NULL,
    items            JSONB  NOT NULL,           -- [{"product_id": .., "quantity": ..}]
    status           TEXT   NOT NULL,
    state            JSONB  NOT NULL,           -- the pure state machine's SagaState
    version          BIGINT NOT NULL DEFAULT 1, -- optimistic concurrency
    total_amount_cents BIGINT NOT NULL DEFAULT 0,
    failure_reason   TEXT,
    last_error       TEXT,
    current_step     TEXT,
    attempts         INT    NOT NULL DEFAULT 0,
    cancel_requested BOOLEAN NOT NULL DEFAULT false,
    -- When the next attempt is due (a stored backoff survives restarts).
    next_attempt_at  TIMESTAMPTZ,
    -- The replica driving the saga, until when.
    lease_owner      TEXT,
    lease_expires_at TIMESTAMPTZ,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at      TIMESTAMPTZ
);

-- The sweeper's queue: sagas that still have work, by due time.
CREATE INDEX sagas_active ON sagas (next_attempt_at)
    WHERE status NOT IN ('COMPLETED', 'FAILED', 'CANCELLED', 'NEEDS_ATTENTION');
CREATE INDEX sagas_by_status ON sagas (status, saga_id DESC);
CREATE INDEX sagas_by_customer ON sagas (customer_id, saga_id DESC);
CREATE INDEX sagas_by_items ON sagas USING GIN (items jsonb_path_ops);
CREATE INDEX sagas_finished ON sagas (finished_at) WHERE finished_at IS NOT NULL;

CREATE TABLE saga_journal (
    entry_id    BIGSERIAL PRIMARY KEY,
    saga_id     TEXT NOT NULL REFERENCES sagas (saga_id),
    step        TEXT NOT NULL,           -- step name, or 'cancel' / 'retry' / 'abort'
    kind        TEXT NOT NULL,           -- ACTION, COMPENSATION or CONTROL
    attempt     INT  NOT NULL DEFAULT 0,
    outcome     TEXT NOT NULL,           -- SUCCEEDED, RETRYABLE_FAILURE, REJECTED, ...
    detail      TEXT NOT NULL DEFAULT '',
    rpc         TEXT NOT NULL DEFAULT '',
    actor       TEXT NOT NULL DEFAULT '', -- the replica, client or operator
    started_at  TIMESTAMPTZ NOT NULL,
    finished_at TIMESTAMPTZ
);
CREATE INDEX saga_journal_by_saga ON saga_journal (saga_id, entry_id);
