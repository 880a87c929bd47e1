-- When the saga last made progress: its status or current step changed.
-- Retried attempts do not count, so a saga retrying forever shows as stuck.
ALTER TABLE sagas ADD COLUMN progress_at TIMESTAMPTZ NOT NULL DEFAULT now();
UPDATE sagas SET progress_at = updated_at;
CREATE INDEX sagas_stuck ON sagas (progress_at)
    WHERE status NOT IN ('COMPLETED', 'FAILED', 'CANCELLED');
