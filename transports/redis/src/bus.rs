//! [`RedisBus`]: the [`Bus`] on Redis, in broadcast mode (PUBLISH / SUBSCRIBE) or stream mode
//! (Redis Streams), and its [`RedisFactory`] for the config registry.

use std::fmt;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use redis::aio::MultiplexedConnection;
use tokio::sync::{mpsc, oneshot, watch};

use busway::transport::BoxFuture;
use busway::{
    transport::{request_via_inbox, BuildContext, Counters, TransportFactory, INBOX_PREFIX},
    Bus, Capabilities, Error, ErrorKind, Health, Message, Mode, Pattern, Result, StatsSnapshot,
    SubscribeOptions, Subscription,
};

use crate::config::{Framing, OnDisconnect, RedisConfig};
use crate::conn::Connector;
use crate::frame;
use crate::pubsub::PubSub;
use crate::stream::StreamState;
use crate::writer::{Item, Writer};

/// The state shared by a bus's handles and its background tasks.
pub(crate) struct Inner {
    pub(crate) config: RedisConfig,
    pub(crate) connector: Connector,
    pub(crate) stats: Arc<Counters>,
    pub(crate) closed: AtomicBool,
    pub(crate) cmd_up: AtomicBool,
    pub(crate) pubsub_up: AtomicBool,
    pub(crate) pubsub_started: AtomicBool,
    /// Stream readers currently without a connection.
    pub(crate) readers_down: AtomicUsize,
    /// Publishes accepted and not yet answered by the server.
    pub(crate) queued: AtomicUsize,
    pub(crate) shutdown: watch::Sender<bool>,
    pub(crate) pubsub: PubSub,
    pub(crate) stream: StreamState,
    cmd: Mutex<Option<MultiplexedConnection>>,
    tx: mpsc::Sender<Item>,
    me: Weak<Inner>,
}

impl Inner {
    /// A handle for deliveries to reply through; it does not keep the bus open.
    pub(crate) fn handle(&self) -> Arc<dyn Bus> {
        Arc::new(RedisBus {
            inner: self.me.upgrade().expect("a task holds the bus"),
            _alive: None,
        })
    }

    pub(crate) fn set_cmd_connection(&self, con: Option<MultiplexedConnection>) {
        *self.cmd.lock() = con;
    }

    /// A clone of the command connection (commands on it pipeline with everyone else's).
    ///
    /// # Errors
    /// `Connection` while it is down.
    pub(crate) fn cmd_connection(&self) -> Result<MultiplexedConnection> {
        self.cmd
            .lock()
            .clone()
            .ok_or_else(|| self.connector.disconnected_plain())
    }

    fn health(&self) -> Health {
        if self.closed.load(Relaxed) {
            return Health::Closed;
        }
        let pubsub_ok = !self.pubsub_started.load(Relaxed) || self.pubsub_up.load(Relaxed);
        if self.cmd_up.load(Relaxed) && pubsub_ok && self.readers_down.load(Relaxed) == 0 {
            Health::Up
        } else {
            Health::Connecting
        }
    }

    fn is_inbox(topic: &str) -> bool {
        topic
            .strip_prefix(INBOX_PREFIX)
            .is_some_and(|rest| rest.starts_with('.'))
    }

    fn capabilities(&self) -> Capabilities {
        let max = self.config.options.max_payload;
        match self.config.mode {
            Mode::Broadcast => {
                let mut c = Capabilities::broadcast(max);
                // Groups are refused rather than emulated: Redis pub/sub has no competing
                // consumers; stream mode has real ones.
                c.groups = false;
                let framed = self.config.options.framing == Framing::Busway;
                c.headers = framed;
                c.request_reply = framed;
                c
            }
            Mode::Stream => Capabilities::stream(max),
        }
    }

    async fn publish(&self, message: Message) -> Result<()> {
        if self.closed.load(Relaxed) {
            return Err(Error::closed(format!("bus {:?}", self.config.bus)));
        }
        self.capabilities()
            .check_payload(&self.config.bus, &message)?;
        if !self.cmd_up.load(Relaxed) {
            match self.config.options.on_disconnect {
                OnDisconnect::Fail => {
                    Counters::incr(&self.stats.errors);
                    return Err(self.connector.disconnected());
                }
                OnDisconnect::Buffer => {
                    if self.queued.load(Relaxed) >= self.config.options.buffer_max {
                        Counters::incr(&self.stats.errors);
                        return Err(Error::new(
                            ErrorKind::BufferFull,
                            format!(
                                "bus {:?}: {} publishes are held while {} is unreachable (buffer_max = {}); {:?} was not published",
                                self.config.bus,
                                self.queued.load(Relaxed),
                                self.config.redacted_url(),
                                self.config.options.buffer_max,
                                message.topic.as_str()
                            ),
                        ));
                    }
                }
            }
        }
        let timeout = self.config.response_timeout();
        let stream = self.config.mode == Mode::Stream && !Self::is_inbox(message.topic.as_str());
        let topic = message.topic.clone();
        let (item, done) = if stream {
            let (tx, rx) = oneshot::channel();
            (
                Item::Xadd {
                    topic: message.topic.clone(),
                    fields: crate::stream::fields(message),
                    done: tx,
                },
                Some(rx),
            )
        } else {
            let data = if self.config.options.framing == Framing::Raw {
                message.payload.to_vec()
            } else {
                frame::encode(&message)
            };
            (
                Item::Publish {
                    channel: message.topic,
                    data,
                },
                None,
            )
        };
        self.queued.fetch_add(1, Relaxed);
        let timed_out = || {
            Counters::incr(&self.stats.errors);
            Error::new(
                ErrorKind::Timeout,
                format!(
                    "bus {:?}: publish on {:?} not accepted by {} within {timeout:?}",
                    self.config.bus,
                    topic.as_str(),
                    self.config.redacted_url()
                ),
            )
        };
        let closed = || Error::closed(format!("bus {:?}", self.config.bus));
        // The channel almost always has room: a timer (a clock read, a timer-wheel entry and
        // a reference to the runtime per publish) is made only when it is full.
        let queued = match self.tx.try_send(item) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(closed()),
            Err(mpsc::error::TrySendError::Full(item)) => {
                match tokio::time::timeout(timeout, self.tx.send(item)).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(_)) => Err(closed()),
                    Err(_) => Err(timed_out()),
                }
            }
        };
        if let Err(e) = queued {
            self.queued.fetch_sub(1, Relaxed);
            return Err(e);
        }
        if let Some(done) = done {
            match tokio::time::timeout(timeout, done).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => return Err(e),
                Ok(Err(_)) => return Err(closed()),
                Err(_) => return Err(timed_out()),
            }
        }
        Counters::incr(&self.stats.published);
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        let timeout = self.config.response_timeout();
        let err = || {
            Error::new(
                ErrorKind::Timeout,
                format!(
                    "bus {:?}: flush: {} publishes not acknowledged by {} within {timeout:?}",
                    self.config.bus,
                    self.queued.load(Relaxed),
                    self.config.redacted_url()
                ),
            )
        };
        tokio::time::timeout(timeout, async {
            if self.tx.send(Item::Flush(tx)).await.is_err() {
                return;
            }
            let _ = rx.await;
        })
        .await
        .map_err(|_| err())
    }
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

struct Alive(Weak<Inner>);

impl Drop for Alive {
    fn drop(&mut self) {
        if let Some(inner) = self.0.upgrade() {
            let _ = inner.shutdown.send(true);
        }
    }
}

impl fmt::Debug for RedisBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBus")
            .field("name", &self.inner.config.bus)
            .field("url", &self.inner.config.redacted_url())
            .field("mode", &self.inner.config.mode)
            .field("health", &self.inner.health())
            .finish()
    }
}

impl RedisBus {
    /// Connects the command connection and starts the writer. The pub/sub connection opens
    /// with the first broadcast subscription; stream readers with their subscriptions.
    ///
    /// # Errors
    /// `InvalidConfig` for inconsistent options; `Connection` / `Auth` when the server
    /// cannot be reached or refuses the credentials (naming the bus and the redacted URL).
    pub async fn connect(config: RedisConfig) -> Result<RedisBus> {
        config
            .check()
            .map_err(|(key, why)| Error::config(format!("bus {:?}: {key}: {why}", config.bus)))?;
        crate::config::check_url(&config.url)
            .map_err(|why| Error::config(format!("bus {:?}: url: {why}", config.bus)))?;
        let connector = Connector::new(&config)?;
        let (events_tx, events) = mpsc::unbounded_channel();
        let con = connector.connect(None, Some(events_tx)).await?;
        let (tx, rx) = mpsc::channel(config.options.publish_queue);
        let (shutdown, _) = watch::channel(false);
        let inner = Arc::new_cyclic(|me| Inner {
            stats: Arc::new(Counters::default()),
            stream: StreamState::new(&config),
            config,
            connector,
            closed: AtomicBool::new(false),
            cmd_up: AtomicBool::new(true),
            pubsub_up: AtomicBool::new(false),
            pubsub_started: AtomicBool::new(false),
            readers_down: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            shutdown,
            pubsub: PubSub::new(),
            cmd: Mutex::new(Some(con.clone())),
            tx,
            me: me.clone(),
        });
        tokio::spawn(Writer::new(inner.clone(), rx, con, events).run());
        Ok(RedisBus {
            _alive: Some(Arc::new(Alive(Arc::downgrade(&inner)))),
            inner,
        })
    }

    /// The bus's config (the URL's password is redacted by its `Debug`).
    pub fn config(&self) -> &RedisConfig {
        &self.inner.config
    }
}

#[async_trait]
impl Bus for RedisBus {
    fn name(&self) -> &str {
        &self.inner.config.bus
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn publish(&self, message: Message) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.inner.publish(message))
    }

    async fn subscribe(&self, pattern: Pattern, options: SubscribeOptions) -> Result<Subscription> {
        let inner = &self.inner;
        if inner.closed.load(Relaxed) {
            return Err(Error::closed(format!("bus {:?}", inner.config.bus)));
        }
        inner
            .capabilities()
            .check_subscribe(&inner.config.bus, &pattern, &options)?;
        if inner.config.mode == Mode::Broadcast || Inner::is_inbox(pattern.as_str()) {
            PubSub::subscribe(inner, pattern, &options).await
        } else {
            crate::stream::subscribe(inner, pattern, options).await
        }
    }

    async fn request(&self, message: Message, timeout: Duration) -> Result<Message> {
        if !self.inner.capabilities().request_reply {
            return Err(Error::unsupported(format!(
                "bus {:?} uses raw framing: no reply_to header can travel, so request/reply is unsupported",
                self.inner.config.bus
            )));
        }
        request_via_inbox(self, message, timeout).await
    }

    async fn flush(&self) -> Result<()> {
        if self.inner.closed.load(Relaxed) {
            return Err(Error::closed(format!("bus {:?}", self.inner.config.bus)));
        }
        self.inner.flush().await
    }

    async fn close(&self) -> Result<()> {
        let inner = &self.inner;
        if inner.closed.load(Relaxed) {
            return Ok(());
        }
        let flushed = inner.flush().await;
        inner.closed.store(true, Relaxed);
        let _ = inner.shutdown.send(true);
        // The writer drops its connection when it stops; this is the other handle on it, so
        // a closed bus holds no connection even while the bus value lives on (a router keeps
        // the buses a reload retired).
        inner.set_cmd_connection(None);
        inner.pubsub.close_all();
        inner.stream.close_all();
        flushed
    }

    fn stats(&self) -> StatsSnapshot {
        let health = self.inner.health();
        self.inner.stats.set_health(health);
        self.inner.stats.snapshot()
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
