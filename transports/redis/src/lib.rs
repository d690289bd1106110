//! The Redis transport for busway: a [`Bus`](busway::Bus) on Redis pub/sub (broadcast mode)
//! or Redis Streams (stream mode), selected in config with `transport = "redis"`.
//!
//! ```no_run
//! # async fn f() -> busway::Result<()> {
//! let mut registry = busway::Registry::new();
//! busway_redis::register(&mut registry);
//! // ... or directly:
//! let bus = busway_redis::RedisBus::connect(
//!     busway_redis::RedisConfig::new("main", "redis://127.0.0.1:6379"),
//! )
//! .await?;
//! # Ok(()) }
//! ```
//!
//! See the README for connection counts, framing, the stream key layout and the outage
//! policy.

mod ack;
mod bus;
mod config;
mod conn;
pub mod frame;
mod pubsub;
mod reader;
mod stream;
mod writer;

pub use bus::{register, RedisBus, RedisFactory};
pub use config::{Framing, OnDisconnect, RedisConfig, RedisOptions};
