//! Connection set-up: the bus's parsed clients (TLS included), its sentinels or its cluster
//! nodes, named connections, redis errors mapped to busway's, and the reconnect backoff.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{
    AsyncConnectionConfig, Client, ConnectionInfo, IntoConnectionInfo, ProtocolVersion,
    RedisFuture, Value,
};

use busway::transport::{redact_url, scrub_secrets, Counters};
use busway::{Error, ErrorKind};

use crate::config::RedisConfig;
use crate::sentinel::{is_sentinel_url, SentinelSet, SentinelUrl};

/// The least of every timeout and delay: a zero would mean "none" to the client.
const MIN_TIMEOUT: Duration = Duration::from_millis(1);

/// Where a bus's connections go.
enum Target {
    /// One server: its parsed clients (RESP2 for commands, RESP3 for push connections).
    Direct { client: Client, resp3: Client },
    /// The primary the sentinels name, looked up for every connection.
    Sentinel(SentinelSet),
    /// A Redis Cluster, reached through any of these nodes.
    Cluster(Vec<ConnectionInfo>),
}

/// One connection of a bus: to one server (or the primary a Sentinel set names), or to a
/// Redis Cluster (the `redis` crate's cluster connection: one connection per node, commands
/// routed by key slot, `MOVED` / `ASK` and slot changes followed).
#[derive(Clone)]
pub(crate) enum Con {
    One(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Con {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, Value> {
        match self {
            Con::One(c) => c.req_packed_command(cmd),
            Con::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Con::One(c) => c.req_packed_commands(pipeline, offset, count),
            // A cluster pipeline must stay within one slot, and busway's span topics: each
            // command goes on its own, all at once (the cluster connection pipelines them
            // per node), the answers in order.
            Con::Cluster(c) => {
                let c = c.clone();
                Box::pin(async move {
                    let calls = pipeline.cmd_iter().map(|cmd| {
                        let mut c = c.clone();
                        async move { c.req_packed_command(cmd).await }
                    });
                    let answers = futures::future::join_all(calls).await;
                    let answers = answers
                        .into_iter()
                        .collect::<redis::RedisResult<Vec<_>>>()?;
                    Ok(answers.into_iter().skip(offset).take(count).collect())
                })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Con::One(c) => c.get_db(),
            Con::Cluster(c) => c.get_db(),
        }
    }
}

impl Con {
    /// `SUBSCRIBE`, or on a cluster `SSUBSCRIBE` (sharded pub/sub: each channel on the shard
    /// of its slot), one channel at a time there.
    pub(crate) async fn subscribe<S: AsRef<str>>(
        &mut self,
        channels: &[S],
    ) -> redis::RedisResult<()> {
        let names: Vec<&str> = channels.iter().map(AsRef::as_ref).collect();
        match self {
            Con::One(c) => c.subscribe(&names).await,
            Con::Cluster(c) => {
                for name in names {
                    c.ssubscribe(name).await?;
                }
                Ok(())
            }
        }
    }

    /// `UNSUBSCRIBE`, or `SUNSUBSCRIBE` on a cluster.
    pub(crate) async fn unsubscribe(&mut self, channel: &str) -> redis::RedisResult<()> {
        match self {
            Con::One(c) => c.unsubscribe(channel).await,
            Con::Cluster(c) => c.sunsubscribe(channel).await,
        }
    }

    /// `PSUBSCRIBE`; a cluster has no sharded pattern subscriptions (the bus refuses
    /// wildcards there before this is reached).
    pub(crate) async fn psubscribe<S: AsRef<str>>(
        &mut self,
        globs: &[S],
    ) -> redis::RedisResult<()> {
        let globs: Vec<&str> = globs.iter().map(AsRef::as_ref).collect();
        match self {
            Con::One(c) => c.psubscribe(&globs).await,
            Con::Cluster(_) => Err(no_cluster_patterns()),
        }
    }

    /// `PUNSUBSCRIBE`.
    pub(crate) async fn punsubscribe(&mut self, glob: &str) -> redis::RedisResult<()> {
        match self {
            Con::One(c) => c.punsubscribe(glob).await,
            Con::Cluster(_) => Err(no_cluster_patterns()),
        }
    }
}

fn no_cluster_patterns() -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::InvalidClientConfig,
        "pattern subscriptions cannot be sharded on a Redis Cluster",
    ))
}

/// What every connection of one bus shares: where to connect and names for messages.
/// `Debug` shows the URL redacted.
pub(crate) struct Connector {
    target: Target,
    bus: String,
    url: String,
    redacted: String,
    client_name: String,
    connect_timeout: Duration,
    response_timeout: Duration,
    min_backoff: Duration,
    max_backoff: Duration,
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector")
            .field("bus", &self.bus)
            .field("url", &redact_url(&self.url))
            .field("client_name", &self.client_name)
            .finish_non_exhaustive()
    }
}

impl Connector {
    pub(crate) fn new(config: &RedisConfig) -> busway::Result<Connector> {
        let config_error = |e: String| {
            Error::config(format!(
                "bus {:?}: url {:?}: {}",
                config.bus,
                config.redacted_url(),
                scrub_secrets(&e, &config.url)
            ))
        };
        let target = if is_sentinel_url(&config.url) {
            let url = SentinelUrl::parse(&config.url).map_err(config_error)?;
            Target::Sentinel(SentinelSet::new(&url).map_err(|e| config_error(e.to_string()))?)
        } else if crate::cluster::is_cluster_url(&config.url) {
            Target::Cluster(crate::cluster::node_infos(&config.url).map_err(config_error)?)
        } else {
            Target::Direct {
                client: Self::parse(config, false)?,
                resp3: Self::parse(config, true)?,
            }
        };
        Ok(Connector {
            target,
            bus: config.bus.clone(),
            url: config.url.clone(),
            redacted: config.redacted_url(),
            client_name: config.client_name.clone(),
            connect_timeout: config.connect_timeout.max(MIN_TIMEOUT),
            response_timeout: config.response_timeout(),
            min_backoff: config.reconnect_min.max(MIN_TIMEOUT),
            max_backoff: config
                .reconnect_max
                .max(config.reconnect_min)
                .max(MIN_TIMEOUT),
        })
    }

    /// The client of a one-server URL, RESP3 when `resp3`.
    fn parse(config: &RedisConfig, resp3: bool) -> busway::Result<Client> {
        {
            let parse = |resp3: bool| -> busway::Result<Client> {
                let mut info = config.url.as_str().into_connection_info().map_err(|e| {
                    Error::config(format!(
                        "bus {:?}: url {:?}: {}",
                        config.bus,
                        config.redacted_url(),
                        scrub_secrets(&e.to_string(), &config.url)
                    ))
                })?;
                if resp3 {
                    let redis = info
                        .redis_settings()
                        .clone()
                        .set_protocol(ProtocolVersion::RESP3);
                    info = info.set_redis_settings(redis);
                }
                open_client(config, info).map_err(|e| {
                    Error::config(format!(
                        "bus {:?}: url {:?}: {}",
                        config.bus,
                        config.redacted_url(),
                        scrub_secrets(&e.to_string(), &config.url)
                    ))
                })
            };
            parse(resp3)
        }
    }

    /// A multiplexed connection named `busway:<app>:<bus>`. `response_timeout` overrides the
    /// bus's (blocking readers need longer than their BLOCK); `push` makes it a RESP3
    /// connection whose pub/sub messages go to the sender.
    pub(crate) async fn connect(
        &self,
        response_timeout: Option<Duration>,
        push: Option<tokio::sync::mpsc::UnboundedSender<redis::PushInfo>>,
    ) -> busway::Result<Con> {
        if let Target::Cluster(nodes) = &self.target {
            return self.open_cluster(nodes, response_timeout, push).await;
        }
        let cfg = self.config(response_timeout);
        match push {
            Some(tx) => self.open(true, cfg.set_push_sender(tx)).await,
            None => self.open(false, cfg).await,
        }
    }

    /// A RESP3 connection named `busway:<app>:<bus>` whose pushes (pub/sub messages,
    /// subscribe confirmations, its loss) go to `push`, called on the task that reads the
    /// connection.
    pub(crate) async fn connect_with_push(
        &self,
        push: impl redis::aio::AsyncPushSender,
    ) -> busway::Result<Con> {
        if let Target::Cluster(nodes) = &self.target {
            return self.open_cluster(nodes, None, Some(push)).await;
        }
        let cfg = self.config(None).set_push_sender(push);
        self.open(true, cfg).await
    }

    fn config(&self, response_timeout: Option<Duration>) -> AsyncConnectionConfig {
        AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(response_timeout.unwrap_or(self.response_timeout)))
    }

    /// The client to connect with: the URL's, or the one of the primary the sentinels name
    /// now.
    async fn client(&self, resp3: bool) -> busway::Result<Client> {
        match &self.target {
            Target::Direct { client, resp3: r3 } => Ok(if resp3 { r3 } else { client }.clone()),
            // Cluster connections are opened per node by `open_cluster`, never here.
            Target::Cluster(_) => Err(Error::new(
                ErrorKind::Other,
                format!(
                    "bus {:?}: a cluster has no single server to connect to",
                    self.bus
                ),
            )),
            Target::Sentinel(set) => set
                .primary(resp3, self.connect_timeout, &self.bus)
                .await
                .map_err(|why| {
                    Error::new(
                        ErrorKind::Connection,
                        format!(
                            "bus {:?} ({}): connect: {}",
                            self.bus,
                            self.redacted,
                            scrub_secrets(&why, &self.url)
                        ),
                    )
                }),
        }
    }

    async fn open(&self, resp3: bool, cfg: AsyncConnectionConfig) -> busway::Result<Con> {
        let client = self.client(resp3).await?;
        let con = client
            .get_multiplexed_async_connection_with_config(&cfg)
            .await
            .map_err(|e| self.connect_error(e))?;
        self.name(Con::One(con)).await
    }

    /// A cluster connection (RESP3 with `push`), named on every node.
    async fn open_cluster(
        &self,
        nodes: &[ConnectionInfo],
        response_timeout: Option<Duration>,
        push: Option<impl redis::aio::AsyncPushSender>,
    ) -> busway::Result<Con> {
        let mut builder = ClusterClientBuilder::new(nodes.to_vec())
            .connection_timeout(self.connect_timeout)
            .response_timeout(response_timeout.unwrap_or(self.response_timeout));
        if let Some(push) = push {
            builder = builder
                .use_protocol(ProtocolVersion::RESP3)
                .push_sender(push);
        }
        let client = builder
            .build()
            .map_err(|e| self.error("cluster client", e))?;
        let con = tokio::time::timeout(
            self.connect_timeout.saturating_mul(2),
            client.get_async_connection(),
        )
        .await
        .map_err(|_| {
            Error::new(
                ErrorKind::Timeout,
                format!(
                    "bus {:?} ({}): connect: no cluster node answered within {:?}",
                    self.bus,
                    self.redacted,
                    self.connect_timeout.saturating_mul(2)
                ),
            )
        })?
        .map_err(|e| self.connect_error(e))?;
        // `CLIENT SETNAME` goes to every node. A node connection the cluster client reopens
        // on its own (after a node restart) is unnamed until the bus reconnects.
        self.name(Con::Cluster(con)).await
    }

    async fn name(&self, mut con: Con) -> busway::Result<Con> {
        redis::cmd("CLIENT")
            .arg("SETNAME")
            .arg(&self.client_name)
            .exec_async(&mut con)
            .await
            .map_err(|e| self.error("CLIENT SETNAME", e))?;
        Ok(con)
    }

    /// A failed connection attempt, with a hint at the two usual mistakes: a port that
    /// speaks something other than RESP (its greeting does not parse), and `rediss://`
    /// against a server that does not speak TLS (the handshake never completes).
    fn connect_error(&self, e: redis::RedisError) -> Error {
        let prefix = format!("bus {:?} ({}): connect", self.bus, self.redacted);
        if e.kind() == redis::ErrorKind::Parse || e.kind() == redis::ErrorKind::UnexpectedReturnType
        {
            // The parser's text quotes the foreign greeting over several lines: not useful.
            return Error::new(
                ErrorKind::Connection,
                format!(
                    "{prefix}: this does not look like a Redis server (its reply is not RESP; is the port another service's, e.g. NATS?)"
                ),
            );
        }
        let err = self.error("connect", e);
        if self.url.starts_with("rediss://")
            && matches!(err.kind(), ErrorKind::Timeout | ErrorKind::Connection)
        {
            return Error::new(
                ErrorKind::Connection,
                format!(
                    "{}; the TLS handshake did not complete: does the server speak TLS on this port (rediss://), or should the URL be redis://?",
                    err.message()
                ),
            );
        }
        err
    }

    /// A busway error for a failed redis operation, naming the bus and the redacted URL.
    pub(crate) fn error(&self, what: &str, e: redis::RedisError) -> Error {
        let kind = match e.kind() {
            redis::ErrorKind::AuthenticationFailed => ErrorKind::Auth,
            _ if e.is_timeout() => ErrorKind::Timeout,
            _ if e.is_io_error()
                || e.is_connection_dropped()
                || e.is_connection_refusal()
                || e.is_unrecoverable_error() =>
            {
                ErrorKind::Connection
            }
            _ => ErrorKind::Broker,
        };
        let text = scrub_secrets(&e.to_string(), &self.url);
        let text =
            if kind == ErrorKind::Auth || text.contains("NOAUTH") || text.contains("WRONGPASS") {
                return Error::new(
                    ErrorKind::Auth,
                    format!(
                        "bus {:?} ({}): {what}: the server refused the credentials: {text}",
                        self.bus, self.redacted
                    ),
                );
            } else {
                text
            };
        Error::new(
            kind,
            format!("bus {:?} ({}): {what}: {text}", self.bus, self.redacted),
        )
    }

    /// The error publish returns under `on_disconnect = "fail"`.
    pub(crate) fn disconnected(&self) -> Error {
        Error::new(
            ErrorKind::Connection,
            format!(
                "bus {:?}: not connected to {} (on_disconnect = \"fail\")",
                self.bus, self.redacted
            ),
        )
    }

    /// A `Connection` error for commands issued while the command connection is down.
    pub(crate) fn disconnected_plain(&self) -> Error {
        Error::new(
            ErrorKind::Connection,
            format!("bus {:?}: not connected to {}", self.bus, self.redacted),
        )
    }

    /// How many times the sentinels' primary changed under this bus (0 without Sentinel): a
    /// connection opened before the last change may be on a frozen or demoted server.
    pub(crate) fn primary_moves(&self) -> u64 {
        match &self.target {
            Target::Sentinel(set) => set.moves(),
            _ => 0,
        }
    }

    /// The delay before reconnect attempt `attempt` (0-based): doubling from the minimum,
    /// capped, with the upper half jittered so many clients do not return in step.
    pub(crate) fn backoff(&self, attempt: u32) -> Duration {
        let base = self
            .min_backoff
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max_backoff);
        let half = base / 2;
        half + half.mul_f64(rand::random::<f64>())
    }
}

/// A client for `info`, trusting `tls_ca` and presenting `tls_cert` / `tls_key` when set.
#[cfg(feature = "tls")]
fn open_client(config: &RedisConfig, info: redis::ConnectionInfo) -> redis::RedisResult<Client> {
    let o = config;
    if o.tls_ca.is_none() && o.tls_cert.is_none() {
        return Client::open(info);
    }
    let read = |key: &str, path: &str| -> redis::RedisResult<Vec<u8>> {
        std::fs::read(path).map_err(|e| {
            redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "cannot read a TLS file",
                format!("{key} {path:?}: {e}"),
            ))
        })
    };
    let root_cert = o.tls_ca.as_deref().map(|p| read("tls_ca", p)).transpose()?;
    let client_tls = match (&o.tls_cert, &o.tls_key) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read("tls_cert", cert)?,
            client_key: read("tls_key", key)?,
        }),
        _ => None,
    };
    Client::build_with_tls(
        info,
        redis::TlsCertificates {
            client_tls,
            root_cert,
        },
    )
}

#[cfg(not(feature = "tls"))]
fn open_client(config: &RedisConfig, info: redis::ConnectionInfo) -> redis::RedisResult<Client> {
    // The config refuses tls_* keys without a rediss:// URL, and rediss:// without the
    // feature, so nothing is lost here.
    let _ = config;
    Client::open(info)
}

/// Whether a redis error means the connection is unusable (reconnect), as opposed to a
/// command the server refused. `READONLY` counts: the server was a primary and is now a
/// replica (a Sentinel failover), so the next connection must find the new primary.
pub(crate) fn is_connection_error(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
        || e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
        || e.is_timeout()
}

/// Counts one open connection while alive.
#[derive(Debug)]
pub(crate) struct ConnCount(Arc<Counters>);

impl ConnCount {
    pub(crate) fn new(stats: &Arc<Counters>) -> ConnCount {
        stats
            .connections
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ConnCount(stats.clone())
    }
}

impl Drop for ConnCount {
    fn drop(&mut self) {
        self.0
            .connections
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}
