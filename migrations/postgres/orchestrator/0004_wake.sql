-- A request (cancel, retry, abort) accepted by any replica marks its saga
-- as woken. The replica holding the saga's lease finds its woken sagas with
-- one indexed query per sweeper tick and wakes their drivers, which may be
-- waiting out a long backoff; the driver's next write clears the mark.
-- Polling, not LISTEN/NOTIFY, so that it works on every PostgreSQL-wire
-- engine. Few rows are marked at any time: the partial index stays small.
ALTER TABLE sagas ADD COLUMN wake_requested_at TIMESTAMPTZ;
CREATE INDEX sagas_woken ON sagas (lease_owner) WHERE wake_requested_at IS NOT NULL;
