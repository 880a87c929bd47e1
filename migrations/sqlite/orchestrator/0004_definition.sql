-- Each saga records the definition it started under: its name and version.
-- The executor drives a saga by that version only, so a deploy that adds
-- a version lets sagas in flight finish as they began. Every saga before
-- this migration is an order saga of version 1. Written at creation only.
ALTER TABLE sagas ADD COLUMN definition_name TEXT NOT NULL DEFAULT 'order';
ALTER TABLE sagas ADD COLUMN definition_version INTEGER NOT NULL DEFAULT 1;
