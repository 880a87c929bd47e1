-- The W3C traceparent of the trace a saga belongs to (the PlaceOrder call's
-- span, or the caller's), so a driver that resumes the saga on any replica
-- continues that trace. NULL when the order came with no trace context and
-- tracing was off. Written at creation only, read with the row.
ALTER TABLE sagas ADD COLUMN trace_parent TEXT;
