//! Transport factories keyed by kind (`memory`, `redis`, `nats`), so config picks the transport.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use serde::de::DeserializeOwned;

use crate::bus::Bus;
use crate::config::{options_from_table, BusConfig, Config};
use crate::error::{Error, ErrorKind, Result};

/// What a factory gets to build one bus.
#[derive(Debug, Clone, Copy)]
pub struct BuildContext<'a> {
    /// The app name (`[app] name`); broker client names are `busway:<app>:<bus>`.
    pub app: &'a str,
    /// The bus's name.
    pub bus: &'a str,
    /// The bus's config.
    pub config: &'a BusConfig,
    /// Where the config came from, for error messages.
    pub source: &'a str,
}

impl BuildContext<'_> {
    /// The client name for connections of this bus: `busway:<app>:<bus>`.
    pub fn client_name(&self) -> String {
        format!("busway:{}:{}", self.app, self.bus)
    }

    /// Reads the transport-specific keys of the bus into `T` (use
    /// `#[serde(deny_unknown_fields)]`, so a misspelt key is an error).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidConfig`] naming the file, `buses.<bus>` and the reason.
    pub fn options<T: DeserializeOwned>(&self) -> Result<T> {
        options_from_table(
            &self.config.options,
            self.source,
            &format!("buses.{}", self.bus),
        )
    }

    /// Refuses keys that were renamed: each `(old, new)` pair present as `old` is an error
    /// naming the new key. Call it before [`options`](Self::options), whose "unknown field"
    /// error would not say where the key went.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidConfig`]: `<file>: buses.<bus>.<old>: renamed to <new> (...)`.
    pub fn check_renamed(&self, renamed: &[(&str, &str)]) -> Result<()> {
        match renamed
            .iter()
            .find(|(old, _)| self.config.options.contains_key(*old))
        {
            Some((old, new)) if old.ends_with("_ms") => Err(self.config_error(
                old,
                format_args!("renamed to `{new}`, a duration with a unit (e.g. \"500ms\", \"5s\")"),
            )),
            Some((old, new)) => Err(self.config_error(old, format_args!("renamed to `{new}`"))),
            None => Ok(()),
        }
    }

    /// An [`ErrorKind::InvalidConfig`] error naming the file and `buses.<bus>.<key>`.
    pub fn config_error(&self, key: &str, why: impl fmt::Display) -> Error {
        Error::config(format!("{}: buses.{}.{key}: {why}", self.source, self.bus))
    }
}

/// Builds buses of one transport kind.
#[async_trait]
pub trait TransportFactory: Send + Sync + fmt::Debug + 'static {
    /// The kind name used in config (`transport = "<kind>"`).
    fn kind(&self) -> &'static str;

    /// Checks a bus's config without connecting: every key, value and URL that
    /// [`build`](Self::build) would refuse is refused here with the same error. `busway
    /// check` runs it, and [`Router::from_config`](crate::Router::from_config) runs it for
    /// every bus before opening any connection.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidConfig`] naming the file, `buses.<bus>.<key>` and the reason.
    fn validate(&self, ctx: BuildContext<'_>) -> Result<()>;

    /// Builds (and connects) a bus.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidConfig`] for bad keys or values (naming them);
    /// [`ErrorKind::Connection`] when the broker cannot be reached.
    async fn build(&self, ctx: BuildContext<'_>) -> Result<Arc<dyn Bus>>;
}

/// The known transport kinds. [`Registry::new`] knows `memory`; transport crates add theirs
/// with their `register` function.
#[derive(Debug, Clone)]
pub struct Registry {
    factories: BTreeMap<&'static str, Arc<dyn TransportFactory>>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new()
    }
}

impl Registry {
    /// A registry that knows the built-in `memory` transport.
    pub fn new() -> Registry {
        let mut r = Registry {
            factories: BTreeMap::new(),
        };
        r.register(crate::memory::MemoryFactory);
        r
    }

    /// Adds (or replaces) the factory for its kind.
    pub fn register(&mut self, factory: impl TransportFactory) {
        self.factories.insert(factory.kind(), Arc::new(factory));
    }

    /// The registered kinds, sorted.
    pub fn kinds(&self) -> Vec<&'static str> {
        self.factories.keys().copied().collect()
    }

    /// Builds the bus named `bus` of `config` with the factory its `transport` names.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> busway::Result<()> {
    /// let config = busway::Config::from_toml("[buses.main]\ntransport = \"memory\"", "inline")?;
    /// let bus = busway::Registry::new().build(&config, "main").await?;
    /// assert_eq!(bus.name(), "main");
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::InvalidConfig`] when `config` has no such bus; otherwise as
    /// [`Registry::build_context`].
    pub async fn build(&self, config: &Config, bus: &str) -> Result<Arc<dyn Bus>> {
        self.build_context(context(config, bus)?).await
    }

    /// Checks every bus of `config` without connecting: its transport is known and its
    /// factory accepts its keys ([`TransportFactory::validate`]).
    ///
    /// # Errors
    /// The first bus's error, as [`Registry::build`] would return it.
    pub fn validate(&self, config: &Config) -> Result<()> {
        for bus in config.buses.keys() {
            let ctx = context(config, bus)?;
            self.factory(&ctx)?.validate(ctx)?;
        }
        Ok(())
    }

    /// Builds one bus from a [`BuildContext`] with the factory its config names.
    ///
    /// # Errors
    /// [`ErrorKind::UnknownTransport`] naming the file, the key and the known kinds; or
    /// whatever the factory returns.
    pub async fn build_context(&self, ctx: BuildContext<'_>) -> Result<Arc<dyn Bus>> {
        self.factory(&ctx)?.build(ctx).await
    }

    fn factory(&self, ctx: &BuildContext<'_>) -> Result<&Arc<dyn TransportFactory>> {
        let kind = ctx.config.transport.as_str();
        self.factories.get(kind).ok_or_else(|| {
            Error::new(
                ErrorKind::UnknownTransport,
                format!(
                    "{}: buses.{}.transport: unknown transport {kind:?}; known transports: {}",
                    ctx.source,
                    ctx.bus,
                    self.kinds().join(", ")
                ),
            )
        })
    }
}

/// The build context of bus `bus` of `config`.
fn context<'a>(config: &'a Config, bus: &'a str) -> Result<BuildContext<'a>> {
    let bus_config = config.buses.get(bus).ok_or_else(|| {
        Error::config(format!(
            "{}: buses.{bus}: no such bus; the config has: {}",
            config.source,
            config.buses.keys().cloned().collect::<Vec<_>>().join(", ")
        ))
    })?;
    Ok(BuildContext {
        app: &config.app,
        bus,
        config: bus_config,
        source: &config.source,
    })
}
