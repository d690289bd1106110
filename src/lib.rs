//! busway routes a platform's messages to named buses through a routing table.
//!
//! Engines hold an `Arc<dyn Bus>`. A [`Router`] (itself a [`Bus`]) sends each topic to the
//! bus or buses its routing table names; each bus is a transport chosen in config: in-memory
//! ([`MemoryBus`]), Redis (`busway-redis`) or NATS (`busway-nats`). Moving a topic to another
//! bus, or a bus to another transport, is a config change; tests run every bus in memory.
//!
//! ```
//! use std::sync::Arc;
//! use busway::{Bus, BusExt, MemoryBus, Pattern, SubscribeOptions, Topic};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> busway::Result<()> {
//! let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new("main"));
//! let mut quotes = bus.subscribe(Pattern::new("marketdata.quotes.*")?, SubscribeOptions::new()).await?;
//! bus.publish_json(&Topic::new("marketdata.quotes.AAPL")?, &(189.5, 189.6)).await?;
//! let d = quotes.recv().await.expect("one quote");
//! assert_eq!(d.decode::<(f64, f64)>()?, (189.5, 189.6));
//! # Ok(()) }
//! ```

mod bus;
mod codec;
pub mod config;
mod error;
mod memory;
mod message;
mod options;
pub mod queue;
mod registry;
mod router;
mod stats;
mod subscription;
mod topic;

pub use bus::{request_via_inbox, Bus, Capabilities, Mode, INBOX_PREFIX};
pub use codec::{BusExt, Codec};
pub use config::{BusConfig, Config, RouteConfig, RouterSettings};
pub use error::{Error, ErrorKind, Result};
pub use memory::{MemoryBus, MemoryConfig, MemoryFactory};
pub use message::{new_message_id, now_micros, Headers, Message};
pub use options::{
    Overflow, QueueDefaults, StartFrom, SubscribeOptions, DEFAULT_ACK_TIMEOUT, DEFAULT_CAPACITY,
};
pub use registry::{BuildContext, Registry, TransportFactory};
pub use router::{
    ReloadReport, Router, RouterBuilder, RoutingTable, DEFAULT_DEDUP_WINDOW, DEFAULT_DRAIN_GRACE,
    DEFAULT_ROUTE_CACHE,
};
pub use stats::{Counters, Health, StatsSnapshot};
pub use subscription::{ack_each, Accept, Acker, Delivery, MergeHandle, Subscription};
pub use topic::{Pattern, PatternToken, Topic, MAX_TOPIC_LEN};
