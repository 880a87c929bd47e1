-- Indexes of live work, as on PostgreSQL, so the stats, the scrape and the
-- stuck filter read the sagas that are not terminal and the last minute's
-- finishes, never the settled history.
CREATE INDEX sagas_stuck ON sagas (progress_at)
    WHERE status NOT IN ('COMPLETED', 'FAILED', 'CANCELLED');
CREATE INDEX sagas_finished ON sagas (finished_at) WHERE finished_at IS NOT NULL;
