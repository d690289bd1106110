//! The [`Router`]: a [`Bus`] that sends each topic to the buses its routing table names.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::bus::{Bus, Capabilities};
use crate::config::Config;
use crate::error::Result;
use crate::message::Message;
use crate::options::SubscribeOptions;
use crate::registry::Registry;
use crate::stats::StatsSnapshot;
use crate::subscription::Subscription;
use crate::topic::{Pattern, Topic};

/// The ordered routing table: first match wins, then the default.
#[derive(Debug, Clone)]
pub struct RoutingTable {}

impl RoutingTable {
    /// The table a config describes (validated: unknown buses, shadowed rules).
    pub fn from_config(_config: &Config) -> Result<RoutingTable> {
        todo!()
    }

    /// The bus names a topic goes to.
    pub fn lookup(&self, _topic: &Topic) -> Result<Vec<String>> {
        todo!()
    }
}

/// Builds a [`Router`] from buses and rules in code.
#[derive(Debug, Default)]
pub struct RouterBuilder {}

impl RouterBuilder {
    /// Adds a named bus.
    pub fn bus(self, _name: &str, _bus: Arc<dyn Bus>) -> Self {
        todo!()
    }
    /// Adds a rule (pattern -> one or more buses); errors surface at `build`.
    pub fn route(self, _pattern: &str, _to: &[&str]) -> Self {
        todo!()
    }
    /// Sets the default bus (or buses).
    pub fn default_to(self, _to: &[&str]) -> Self {
        todo!()
    }
    /// Validates and builds.
    pub fn build(self) -> Result<Router> {
        todo!()
    }
}

/// A bus of buses.
#[derive(Debug)]
pub struct Router {}

impl Router {
    /// Starts a builder.
    pub fn builder() -> RouterBuilder {
        RouterBuilder::default()
    }

    /// Builds every bus of `config` through `registry`, then the router.
    pub async fn from_config(_config: &Config, _registry: &Registry) -> Result<Router> {
        todo!()
    }

    /// The bus names `topic` goes to.
    pub fn route(&self, _topic: &Topic) -> Result<Vec<String>> {
        todo!()
    }

    /// A named bus.
    pub fn bus(&self, _name: &str) -> Option<Arc<dyn Bus>> {
        todo!()
    }

    /// Every bus with its name, sorted by name.
    pub fn buses(&self) -> Vec<(String, Arc<dyn Bus>)> {
        todo!()
    }
}

#[async_trait]
impl Bus for Router {
    fn name(&self) -> &str {
        "router"
    }
    fn capabilities(&self) -> Capabilities {
        todo!()
    }
    async fn publish(&self, _message: Message) -> Result<()> {
        todo!()
    }
    async fn subscribe(
        &self,
        _pattern: Pattern,
        _options: SubscribeOptions,
    ) -> Result<Subscription> {
        todo!()
    }
    async fn request(&self, _message: Message, _timeout: Duration) -> Result<Message> {
        todo!()
    }
    async fn flush(&self) -> Result<()> {
        todo!()
    }
    async fn close(&self) -> Result<()> {
        todo!()
    }
    fn stats(&self) -> StatsSnapshot {
        todo!()
    }
}
