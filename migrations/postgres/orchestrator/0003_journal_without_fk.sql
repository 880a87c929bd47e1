-- The journal's foreign key checked, for every journal row, that its saga
-- exists: a lookup and a row lock on the saga row the same statement had
-- just updated. Journal rows are only ever written by the statement that
-- updates their saga row (or, for requests, after reading it), and sagas
-- are never deleted, so the check could not fail; on the write path it cost
-- more than the insert it guarded.
ALTER TABLE saga_journal DROP CONSTRAINT IF EXISTS saga_journal_saga_id_fkey;
