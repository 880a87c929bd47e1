-- One database per service: every participant owns its own.
CREATE DATABASE inventory;
CREATE DATABASE payment;
CREATE DATABASE fulfillment;
CREATE DATABASE orchestrator;
