-- Idempotency keys are scoped to the customer: the same key sent by two
-- customers names two orders, never one customer's order for the other.
CREATE UNIQUE INDEX sagas_customer_key ON sagas (customer_id, idempotency_key);
ALTER TABLE sagas DROP CONSTRAINT sagas_idempotency_key_key;
