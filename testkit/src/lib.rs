//! Test support for busway: the conformance suite every [`Bus`](busway::Bus) must pass, and
//! harnesses that start real `redis-server` / `nats-server` processes on free loopback ports,
//! and foreign (Python) clients for the mixed-fleet tests.

pub mod conformance;
pub mod faults;
pub mod logs;
pub mod metrics;
pub mod nats;
pub mod nats_cluster;
pub mod python;
pub mod redis;
pub mod redis_cluster;
pub mod redis_sentinel;
mod server;
pub mod tls;

pub use server::{broker_binary, free_port, free_ports, ServerProcess};
