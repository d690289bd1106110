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

mod broadcast;
mod bus;
mod cluster;
mod config;
mod connect;
pub mod layout;
mod publish;
mod sentinel;
mod state;
mod stream;
pub mod wire;

pub use bus::{register, RedisBus, RedisFactory};
pub use busway::transport::{Framing, OnDisconnect};
pub use cluster::cluster_nodes;
pub use config::{RedisConfig, RedisOptions, Unframed};
pub use layout::{LayoutOptions, StreamMapping, TimestampUnit};
pub use sentinel::{sentinel_nodes, ServerNode};
