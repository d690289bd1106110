//! The library half of the `busway` command: the subcommands (`check`, `route`, `pub`,
//! `tail`, `audit`, `top`) and the seven-engine demo, kept out of `main.rs` so tests and other binaries can
//! drive them.
//!
//! Start-up code is the only place that knows transport crates exist: [`registry`] is where
//! they are registered. Everything else, the demo engines included, sees `Arc<dyn Bus>`.

pub mod audit;
pub mod commands;
pub mod demo;
pub mod text;
pub mod top;

use busway::Registry;

/// The transport registry every subcommand builds buses with.
///
/// `memory` is built into busway; broker transports are added here, in one place, so a
/// config naming them works in every subcommand.
pub fn registry() -> Registry {
    let mut registry = Registry::new();
    busway_redis::register(&mut registry);
    busway_nats::register(&mut registry);
    registry
}

// The README's Rust example compiles and runs as a doctest of this crate, which depends on
// every transport the example registers.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
mod readme {}
