//! The nats transport for busway.
