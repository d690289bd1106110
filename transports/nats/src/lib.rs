//! The NATS transport for busway: core NATS in broadcast mode, JetStream in stream mode.
//!
//! Register it and pick it in config; engines never import this crate:
//!
//! ```no_run
//! # async fn run() -> busway::Result<()> {
//! let mut registry = busway::Registry::new();
//! busway_nats::register(&mut registry);
//! // [buses.marketdata]
//! // transport = "nats"
//! // url = "nats://10.0.0.1:4222,nats://10.0.0.2:4222"
//! # Ok(()) }
//! ```
//!
//! - **Broadcast** (core NATS): busway patterns are NATS subjects (same `*` / `>` rules),
//!   groups are queue groups, headers are NATS headers (`Busway-Id`, `Content-Type`... see the
//!   README), one client connection per bus named `busway:<app>:<bus>`.
//! - **Stream** (JetStream): the bus's stream is created or updated at build; groups are
//!   durable pull consumers; ack / nack (with delay) / redelivery after the ack timeout;
//!   `max_deliveries` with a dead-letter topic; publishes wait for their PubAck, pipelined.
//! - **Request/reply** uses NATS's own inboxes; no responder is
//!   [`ErrorKind::NoResponders`](busway::ErrorKind::NoResponders), not a hang.
//! - **Slow consumers**: every async-nats subscriber is pumped into busway's per-subscription
//!   queues, so each subscription's overflow policy applies; what async-nats itself drops is
//!   counted in `dropped`. Subscriptions of one pattern without a group under a policy that
//!   never waits share one NATS subscription; a `block` one has its own (see the README).
//!
//! Configure it in the bus's config table ([`NatsOptions`] lists every key and its default)
//! or in code with [`NatsConfig`] and [`NatsBus::connect`].

mod broadcast;
mod bus;
pub mod config;
mod connect;
mod drops;
mod held;
mod names;
mod publish;
mod pump;
mod state;
mod stream;
mod wire;

pub use bus::{register, NatsBus, NatsFactory};
pub use config::{NatsConfig, NatsOptions};
