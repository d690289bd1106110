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

//! # Where things are
//! - The crate root: what engine code uses.
//! - [`config`], [`router`], [`memory`], [`topic`]: the rest of each part's public types
//!   (settings, builders, reports, limits).
//! - [`transport`]: what a transport author needs, and how to write a transport.
//! - [`metrics`], [`trace`]: Prometheus metrics of every router and bus, and W3C trace
//!   context carried in message headers (docs/OBSERVABILITY.md).

mod bus;
mod codec;
pub mod config;
mod delivery;
mod error;
pub mod memory;
mod message;
pub mod metrics;
mod options;
mod queue;
mod registry;
pub mod router;
mod stats;
mod subscription;
pub mod topic;
pub mod trace;
pub mod transport;
mod url;

pub use bus::{Bus, Capabilities, Mode};
pub use codec::{BusExt, Codec};
pub use config::Config;
pub use delivery::Delivery;
pub use error::{Error, ErrorKind, Result};
pub use memory::MemoryBus;
pub use message::{Headers, Message};
pub use options::{Overflow, StartFrom, SubscribeOptions};
pub use registry::Registry;
pub use router::Router;
pub use stats::{GroupLag, Health, StatsSnapshot};
pub use subscription::Subscription;
pub use topic::{Pattern, Topic};
