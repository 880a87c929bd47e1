-- A request (cancel, retry, abort) marks its saga as woken; the replica
-- holding its lease finds it with one indexed query per sweeper tick and
-- wakes its driver (see the PostgreSQL migration of the same name). The
-- driver's next write clears the mark.
ALTER TABLE sagas ADD COLUMN wake_requested_at REAL;
CREATE INDEX sagas_woken ON sagas (lease_owner) WHERE wake_requested_at IS NOT NULL;
