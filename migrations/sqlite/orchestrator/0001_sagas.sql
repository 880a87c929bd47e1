-- Orchestrator on SQLite (the embedded mode): the same tables as on
-- PostgreSQL; JSON as TEXT, times as REAL seconds since the Unix epoch.

CREATE TABLE sagas (
    saga_id            TEXT PRIMARY KEY,
    idempotency_key    TEXT UNIQUE,
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
    finished_at        REAL
);

CREATE INDEX sagas_active ON sagas (next_attempt_at)
    WHERE status NOT IN ('COMPLETED', 'FAILED', 'CANCELLED', 'NEEDS_ATTENTION');
CREATE INDEX sagas_by_status ON sagas (status, saga_id);
CREATE INDEX sagas_by_customer ON sagas (customer_id, saga_id);

CREATE TABLE saga_journal (
    entry_id    INTEGER PRIMARY KEY AUTOINCREMENT,
    saga_id     TEXT    NOT NULL REFERENCES sagas (saga_id),
    step        TEXT    NOT NULL,
    kind        TEXT    NOT NULL,
    attempt     INTEGER NOT NULL DEFAULT 0,
    outcome     TEXT    NOT NULL,
    detail      TEXT    NOT NULL DEFAULT '',
    rpc         TEXT    NOT NULL DEFAULT '',
    actor       TEXT    NOT NULL DEFAULT '',
    started_at  REAL    NOT NULL,
    finished_at REAL
);
CREATE INDEX saga_journal_by_saga ON saga_journal (saga_id, entry_id);
