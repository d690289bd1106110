//! [`RedisBus`]: the [`Bus`] on Redis, in broadcast mode (PUBLISH / SUBSCRIBE) or stream mode
//! (Redis Streams), and its [`RedisFactory`] for the config registry.

use std::fmt;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

use busway::transport::{is_inbox, request_via_inbox, BoxFuture, BuildContext, TransportFactory};
use busway::{
    Bus, Capabilities, Error, GroupLag, Message, Mode, Pattern, Result, StatsSnapshot,
    SubscribeOptions, Subscription,
};

use crate::broadcast::Broadcast;
use crate::config::RedisConfig;
use crate::connect::Connector;
use crate::publish::Publisher;
use crate::state::Shared;
use crate::stream::{self, StreamState};

/// The parts of one bus, each built on the same [`Shared`].
struct Inner {
    shared: Arc<Shared>,
    publisher: Publisher,
    broadcast: Arc<Broadcast>,
    streams: Arc<StreamState>,
}

/// A Redis bus. Cheap to clone; every clone is the same bus.
///
/// Build one with [`RedisBus::connect`] or through the registry (`transport = "redis"`).
/// Dropping every handle without [`Bus::close`] stops the background tasks after a last
/// attempt to send queued publishes.
#[derive(Clone)]
pub struct RedisBus {
    inner: Arc<Inner>,
    /// Present in user handles; when the last one goes, the bus shuts down.
    _alive: Option<Arc<Alive>>,
}

struct Alive(Arc<Shared>);

impl Drop for Alive {
    fn drop(&mut self) {
        let _ = self.0.shutdown.send(true);
    }
}

impl fmt::Debug for RedisBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shared = &self.inner.shared;
        f.debug_struct("RedisBus")
            .field("name", &shared.config.bus)
            .field("url", &shared.config.redacted_url())
            .field("mode", &shared.config.mode)
            .field("health", &shared.health())
            .finish()
    }
}

impl RedisBus {
    /// Connects the command connection and starts the writer. The pub/sub connection opens
    /// with the first broadcast subscription; stream readers with their subscriptions.
    ///
    /// # Errors
    /// `InvalidConfig` for what [`RedisConfig::validate`] refuses; `Connection` / `Auth` when
    /// the server cannot be reached or refuses the credentials (naming the bus and the
    /// redacted URL).
    pub async fn connect(config: RedisConfig) -> Result<RedisBus> {
        config.validate()?;
        let connector = Connector::new(&config)?;
        let (events_tx, events) = mpsc::unbounded_channel();
        let con = connector.connect(None, Some(events_tx)).await?;
        let shared = Arc::new(Shared::new(config, connector, con.clone()));
        let streams = Arc::new(StreamState::new(shared.clone()));
        let (publisher, writer) = Publisher::new(shared.clone(), streams.clone(), con, events);
        tokio::spawn(writer.run());
        Ok(RedisBus {
            _alive: Some(Arc::new(Alive(shared.clone()))),
            inner: Arc::new(Inner {
                broadcast: Arc::new(Broadcast::new(shared.clone())),
                streams,
                publisher,
                shared,
            }),
        })
    }

    /// A handle for deliveries to reply through; it does not keep the bus open.
    fn handle(&self) -> Arc<dyn Bus> {
        Arc::new(RedisBus {
            inner: self.inner.clone(),
            _alive: None,
        })
    }

    /// The bus's config (the URL's password is redacted by its `Debug`).
    pub fn config(&self) -> &RedisConfig {
        &self.inner.shared.config
    }
}

#[async_trait]
impl Bus for RedisBus {
    fn name(&self) -> &str {
        &self.inner.shared.config.bus
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.shared.config.capabilities()
    }

    fn publish(&self, message: Message) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.inner.publisher.publish(message))
    }

    async fn subscribe(&self, pattern: Pattern, options: SubscribeOptions) -> Result<Subscription> {
        let shared = &self.inner.shared;
        if shared.closed.load(Relaxed) {
            return Err(shared.closed_error());
        }
        if shared.config.is_cluster() && !pattern.is_literal() {
            return Err(Error::unsupported(format!(
                "bus {:?} is on a Redis Cluster, whose sharded pub/sub has no pattern subscriptions: subscribe to exact topics, not {pattern}",
                shared.config.bus
            )));
        }
        shared
            .config
            .capabilities()
            .check_subscribe(&shared.config.bus, &pattern, &options)?;
        // Inboxes are pub/sub channels in both modes: a reply is for whoever waits now.
        if shared.config.mode == Mode::Broadcast || is_inbox(pattern.as_str()) {
            self.inner
                .broadcast
                .subscribe(pattern, &options, self.handle())
                .await
        } else {
            stream::subscribe(&self.inner.streams, pattern, options, self.handle()).await
        }
    }

    async fn request(&self, message: Message, timeout: Duration) -> Result<Message> {
        if !self.capabilities().request_reply {
            return Err(Error::unsupported(format!(
                "bus {:?} uses raw framing: no reply_to header can travel, so request/reply is unsupported",
                self.inner.shared.config.bus
            )));
        }
        request_via_inbox(self, message, timeout).await
    }

    async fn flush(&self) -> Result<()> {
        let shared = &self.inner.shared;
        if shared.closed.load(Relaxed) {
            return Err(shared.closed_error());
        }
        self.inner.publisher.flush().await
    }

    async fn close(&self) -> Result<()> {
        let shared = &self.inner.shared;
        if shared.closed.load(Relaxed) {
            return Ok(());
        }
        let flushed = self.inner.publisher.flush().await;
        shared.closed.store(true, Relaxed);
        let _ = shared.shutdown.send(true);
        // Before the command connection goes: another consumer of each group gets what this
        // process read and no handler saw, at once rather than after the claim time.
        self.inner.streams.stop_readers().await;
        self.inner.streams.hand_back_all().await;
        // The writer drops its connection when it stops; this is the other handle on it, so
        // a closed bus holds no connection even while the bus value lives on (a router keeps
        // the buses a reload retired).
        shared.set_cmd_connection(None);
        self.inner.broadcast.close_all();
        self.inner.streams.close_all();
        flushed
    }

    fn stats(&self) -> StatsSnapshot {
        let shared = &self.inner.shared;
        shared.stats.set_health(shared.health());
        shared.stats.snapshot()
    }

    fn transport_kind(&self) -> &str {
        "redis"
    }

    fn consumer_lag(&self) -> BoxFuture<'_, Result<Vec<GroupLag>>> {
        let shared = &self.inner.shared;
        if shared.config.mode != Mode::Stream || shared.closed.load(Relaxed) {
            return Box::pin(std::future::ready(Ok(Vec::new())));
        }
        Box::pin(stream::lag::consumer_lag(shared))
    }
}

/// Builds [`RedisBus`]es for `transport = "redis"`.
#[derive(Debug, Clone, Copy, Default)]
pub struct RedisFactory;

#[async_trait]
impl TransportFactory for RedisFactory {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn validate(&self, ctx: BuildContext<'_>) -> Result<()> {
        RedisConfig::from_context(&ctx).map(drop)
    }

    async fn build(&self, ctx: BuildContext<'_>) -> Result<Arc<dyn Bus>> {
        let config = RedisConfig::from_context(&ctx)?;
        Ok(Arc::new(RedisBus::connect(config).await?))
    }
}

/// Registers the `redis` transport with a registry.
pub fn register(registry: &mut busway::Registry) {
    registry.register(RedisFactory);
}
