//! [`NatsBus`]: one async-nats client per bus, core NATS (broadcast) or JetStream (stream);
//! [`NatsFactory`] builds it from config.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use busway::transport::{is_inbox, BoxFuture, BuildContext, Counters, TransportFactory};
use busway::transport::{Framing, OnDisconnect};
use busway::{
    Bus, Capabilities, Error, ErrorKind, GroupLag, Health, Message, Mode, Pattern, Result,
    StatsSnapshot, SubscribeOptions, Subscription,
};
use futures::FutureExt;

use crate::config::NatsConfig;
use crate::drops::ClientDrops;
use crate::state::Inner;
use crate::stream::StreamSetup;
use crate::{broadcast, connect, publish, pump};

/// A bus on NATS: core NATS in broadcast mode, JetStream in stream mode.
///
/// One async-nats client (one TCP connection, named `busway:<app>:<bus>`) carries every
/// publish, subscription and request of the bus. Build it through the registry
/// ([`register`](crate::register)) or with [`NatsBus::connect`].
#[derive(Debug, Clone)]
pub struct NatsBus {
    inner: Arc<Inner>,
    /// Stream mode: the bus's JetStream stream.
    stream: Option<Arc<StreamSetup>>,
}

impl NatsBus {
    /// Connects a bus described by `config`. In stream mode the JetStream stream is created
    /// (an existing one is used as it is, or changed to the config with `update_stream`).
    ///
    /// ```no_run
    /// # async fn run() -> busway::Result<()> {
    /// use busway_nats::{NatsBus, NatsConfig};
    /// let bus = NatsBus::connect(NatsConfig::new("marketdata", "nats://127.0.0.1:4222")).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::InvalidConfig`] for what [`NatsConfig::from_context`] refuses (naming
    /// the bus and key); [`ErrorKind::Auth`] when the server refuses the credentials (at
    /// once, without retrying); [`ErrorKind::Connection`] when no server answers within
    /// `connect_timeout`; [`ErrorKind::Broker`] when the stream cannot be created.
    pub async fn connect(config: NatsConfig) -> Result<NatsBus> {
        let checked = config
            .check()
            .map_err(|(key, why)| Error::config(format!("bus {:?}: {key}: {why}", config.bus)))?;
        let counters = Arc::new(Counters::default());
        counters.set_health(Health::Connecting);
        let client_drops = Arc::new(ClientDrops::default());
        let client = connect::client(&config, checked.servers, &counters, &client_drops).await?;
        counters.set_health(Health::Up);
        let stream = match checked.stream {
            Some(keys) => Some(Arc::new(
                StreamSetup::ensure(&config.bus, &config.options, keys, &client).await?,
            )),
            None => None,
        };
        let inner = Arc::new(Inner::new(config, client, counters, client_drops));
        if inner.mode == Mode::Broadcast {
            tokio::spawn(pump::settle_loop(Arc::downgrade(&inner)));
        }
        Ok(NatsBus { inner, stream })
    }

    /// The async-nats client (for raw access in tests and benches).
    pub fn client(&self) -> &async_nats::Client {
        &self.inner.client
    }

    /// Stream mode: how many times a JetStream publish was sent again because its PubAck did
    /// not come (`publish_retries`); each retry carries the first attempt's `Nats-Msg-Id`, so
    /// the stream stores the message once. Always 0 in broadcast mode.
    pub fn publish_retries(&self) -> u64 {
        self.inner
            .publish_retries
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.is_closed() {
            Err(self.inner.closed_error())
        } else {
            Ok(())
        }
    }

    fn as_dyn(&self) -> Arc<dyn Bus> {
        Arc::new(self.clone())
    }
}

#[async_trait]
impl Bus for NatsBus {
    fn name(&self) -> &str {
        &self.inner.name
    }

    fn capabilities(&self) -> Capabilities {
        let max = self.inner.max_payload();
        let mut caps = match self.inner.mode {
            Mode::Broadcast => Capabilities::broadcast(max),
            Mode::Stream => Capabilities::stream(max),
        };
        caps.headers = self.inner.options.framing == Framing::Busway;
        caps
    }

    // The checks and the preparation run before the future is boxed, so the box holds only
    // the send (small enough for the allocator's per-thread cache).
    fn publish(&self, message: Message) -> BoxFuture<'_, Result<()>> {
        let inner = &*self.inner;
        let checked = self.check_open().and_then(|()| {
            // The limit alone first: building the whole `Capabilities` costs more than the
            // comparison, on every publish.
            if message.payload.len() > inner.max_payload() {
                self.capabilities()
                    .check_payload(&inner.name, &message)
                    .map_err(|e| inner.failed(e))?;
            }
            if inner.options.on_disconnect == OnDisconnect::Fail && !inner.is_connected() {
                return Err(inner.failed(inner.disconnected_error(&message.topic)));
            }
            Ok(())
        });
        if let Err(e) = checked {
            return Box::pin(std::future::ready(Err(e)));
        }
        match &self.stream {
            Some(stream) if !is_inbox(message.topic.as_str()) => Box::pin(
                stream
                    .publish(inner, message)
                    .map(move |r| inner.published(r)),
            ),
            _ => publish::publish(inner, message),
        }
    }

    async fn subscribe(&self, pattern: Pattern, options: SubscribeOptions) -> Result<Subscription> {
        self.check_open()?;
        let inbox = is_inbox(pattern.as_str());
        if !inbox {
            self.capabilities()
                .check_subscribe(&self.inner.name, &pattern, &options)?;
        }
        if let Some(group) = &options.group {
            if group.is_empty() || group.bytes().any(|b| !(0x21..=0x7e).contains(&b)) {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!(
                        "bus {:?}: group {group:?} must be non-empty printable ASCII without spaces",
                        self.inner.name
                    ),
                ));
            }
        }
        match &self.stream {
            Some(stream) if !inbox => {
                stream
                    .subscribe(&self.inner, pattern, options, self.as_dyn())
                    .await
            }
            _ => broadcast::subscribe(&self.inner, pattern, options, self.as_dyn()).await,
        }
    }

    async fn request(&self, message: Message, timeout: Duration) -> Result<Message> {
        self.check_open()?;
        let inner = &self.inner;
        self.capabilities()
            .check_payload(&inner.name, &message)
            .map_err(|e| inner.failed(e))?;
        if inner.options.on_disconnect == OnDisconnect::Fail && !inner.is_connected() {
            return Err(inner.failed(inner.disconnected_error(&message.topic)));
        }
        match &self.stream {
            Some(stream) if stream.auto || stream.captures(&message.topic) => {
                stream.request(inner, self, message, timeout).await
            }
            _ => broadcast::request(inner, message, timeout).await,
        }
    }

    async fn flush(&self) -> Result<()> {
        self.check_open()?;
        self.inner
            .round_trip()
            .await
            .map_err(|e| self.inner.failed(e))?;
        pump::settle_client_drops(&self.inner).await;
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        let inner = &self.inner;
        if !inner.mark_closed() {
            return Ok(());
        }
        // Stream publishes already awaited their PubAck; make the server take what is
        // still buffered (broadcast) before the connection goes.
        let flushed = inner.round_trip().await;
        inner.stop_pumps().await;
        // Stream mode: what the pulls held is given back as they drain their inboxes; what
        // the queues hold and no handler took is given back then, before the connection
        // goes, so the server redelivers it at once (see `stream::returns`, `stream::pull`).
        if let Some(stream) = &self.stream {
            stream.drained().await;
            stream.give_back_queued();
            stream.close().await;
        }
        // Best effort: the server may already be gone.
        let _ = tokio::time::timeout(Duration::from_secs(5), inner.client.drain()).await;
        inner.counters.set_health(Health::Closed);
        flushed.map_err(|e| e.context("closing"))
    }

    fn stats(&self) -> StatsSnapshot {
        let inner = &self.inner;
        let mut s = inner.counters.snapshot();
        s.dropped += inner.client_drops.count();
        let connected = inner.is_connected();
        // async-nats counts every successful connect: the first is not a reconnect.
        let connects = inner.client.statistics().connects.load(Ordering::Relaxed);
        s.reconnects = connects.saturating_sub(1);
        s.connections = u64::from(connected && !inner.is_closed());
        s.health = if inner.is_closed() {
            Health::Closed
        } else if connected {
            Health::Up
        } else {
            Health::Connecting
        };
        s
    }

    fn transport_kind(&self) -> &str {
        "nats"
    }

    fn consumer_lag(&self) -> BoxFuture<'_, Result<Vec<GroupLag>>> {
        match &self.stream {
            Some(stream) if !self.inner.is_closed() => {
                Box::pin(stream.consumer_lag(&self.inner.name))
            }
            _ => Box::pin(std::future::ready(Ok(Vec::new()))),
        }
    }
}

/// Builds [`NatsBus`]es for `transport = "nats"`.
#[derive(Debug, Clone, Copy, Default)]
pub struct NatsFactory;

#[async_trait]
impl TransportFactory for NatsFactory {
    fn kind(&self) -> &'static str {
        "nats"
    }

    fn validate(&self, ctx: BuildContext<'_>) -> Result<()> {
        NatsConfig::from_context(&ctx).map(drop)
    }

    async fn build(&self, ctx: BuildContext<'_>) -> Result<Arc<dyn Bus>> {
        let config = NatsConfig::from_context(&ctx)?;
        Ok(Arc::new(NatsBus::connect(config).await?))
    }
}

/// Registers the `nats` transport.
pub fn register(registry: &mut busway::Registry) {
    registry.register(NatsFactory);
}
