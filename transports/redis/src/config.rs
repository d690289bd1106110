//! The Redis bus's settings: the shared [`BusConfig`](busway::config::BusConfig) keys plus the
//! Redis-specific keys of [`RedisOptions`] (all optional; unknown keys are an error), read
//! into the typed [`RedisConfig`]. Durations are strings with a unit (`"500ms"`, `"5s"`) or
//! whole seconds.
//!
//! ```toml
//! [buses.engine]
//! transport = "redis"
//! url = "redis://user:password@127.0.0.1:6379/0"   # rediss:// with the `tls` feature
//! # or a Sentinel-managed primary (sentinel port 26379 when left out):
//! # url = "redis+sentinel://user:password@10.0.0.1:26379,10.0.0.2:26379,10.0.0.3:26379/mymaster?db=0"
//! # or a Redis Cluster (broadcast mode, exact topics only):
//! # url = "redis+cluster://user:password@10.0.0.1:7000,10.0.0.2:7000,10.0.0.3:7000"
//! mode = "stream"
//! framing = "busway"          # broadcast mode: busway (headers in a frame) | raw (payload alone)
//! unframed = "skip"           # broadcast, busway framing: a foreign payload (not a frame) is
//!                             # skipped and counted (skip) or delivered without headers (deliver)
//! on_disconnect = "buffer"    # buffer | fail: what publish does while the server is away
//! publish_buffer = 10000      # publishes held while disconnected before BufferFull
//! publish_timeout = "5s"      # how long a publish, flush or command waits for the server
//! stream_maxlen = 100000      # XADD MAXLEN ~ N per stream key; 0 keeps everything
//! key_prefix = "busway:stream:"  # stream key = key_prefix + topic
//! index_key = "busway:topics" # set of topics published in stream mode (wildcard discovery)
//! claim_idle = "30s"          # reclaim entries pending longer than this (default: ack timeout)
//! max_deliveries = 5          # after this many deliveries an entry goes to dead_letter
//! dead_letter = "engine.dead" # topic (on this bus) for entries that failed max_deliveries
//! min_replicas = 1           # stream mode: a publish is Ok once this many replicas hold it (WAIT)
//! min_replicas_timeout = "1s" # how long that WAIT may take before the publish fails
//! tls_ca = "/etc/busway/ca.pem"  # rediss:// only: trust this CA instead of the system's
//! tls_cert = "client.pem"     # rediss:// only: client certificate (mutual TLS), with tls_key
//! tls_key = "client.key"
//! consumer = "{app}-consumer-{instance}" # stream mode: consumer name in a group ({app},
//!                                         # {group}, {bus}; {instance}: $BUSWAY_INSTANCE)
//!
//! [buses.engine.layout]       # stream mode: map topics and fields to an existing layout
//! # see the `layout` module docs and the README's "Existing stream layouts"
//! ```

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use busway::transport::{
    redact_url, scrub_secrets, BuildContext, ConfigDuration, Framing, OnDisconnect,
};
use busway::{config::QueueDefaults, Capabilities, Error, Mode, Result, Topic};

use crate::layout::{Layout, LayoutOptions};

/// Renamed keys, `(old, new)`: an old key is refused naming the new one.
const RENAMED: &[(&str, &str)] = &[
    ("buffer_max", "publish_buffer"),
    ("response_timeout_ms", "publish_timeout"),
    ("connect_timeout_ms", "connect_timeout"),
    ("reconnect_min_ms", "reconnect_min"),
    ("reconnect_max_ms", "reconnect_max"),
    ("block_ms", "read_block"),
    ("rescan_ms", "rescan_interval"),
    ("claim_idle_ms", "claim_idle"),
];

fn d_publish_buffer() -> usize {
    10_000
}
fn d_max_payload() -> usize {
    64 * 1024 * 1024
}
fn d_publish_timeout() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(5))
}
fn d_connect_timeout() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(2))
}
fn d_reconnect_min() -> ConfigDuration {
    ConfigDuration(Duration::from_millis(50))
}
fn d_reconnect_max() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(2))
}
fn d_max_batch() -> usize {
    1_024
}
fn d_publish_queue() -> usize {
    8_192
}
fn d_key_prefix() -> String {
    "busway:stream:".to_string()
}
fn d_index_key() -> String {
    "busway:topics".to_string()
}
fn d_stream_maxlen() -> u64 {
    100_000
}
fn d_read_block() -> ConfigDuration {
    ConfigDuration(Duration::from_millis(500))
}
fn d_read_count() -> usize {
    256
}
fn d_rescan_interval() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(1))
}
fn d_min_replicas_timeout() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(1))
}

/// What a busway-framed broadcast bus does with a payload that is not a busway frame (a
/// foreign publisher's). A frame starts with the byte `0xB5`, which no UTF-8 text starts
/// with, so text and JSON payloads are never taken for frames (docs/WIRE.md).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unframed {
    /// Skipped, counted in `decode_errors` and logged at warn (rate-limited).
    #[default]
    Skip,
    /// Delivered as a message without headers (no reply), counted in `unframed`.
    Deliver,
}

/// The Redis-specific keys of a bus config. Every field has a default (shown in brackets).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RedisOptions {
    /// Broadcast-mode framing (default: `busway`).
    #[serde(default)]
    pub framing: Framing,
    /// Broadcast mode with `busway` framing: what a payload that is not a busway frame
    /// becomes (default: `skip`).
    #[serde(default)]
    pub unframed: Unframed,
    /// Outage policy for publishes (default: `buffer`).
    #[serde(default)]
    pub on_disconnect: OnDisconnect,
    /// Publishes held while disconnected under `buffer` (default: 10000).
    #[serde(default = "d_publish_buffer")]
    pub publish_buffer: usize,
    /// Largest payload accepted, bytes (default: 64 MiB).
    #[serde(default = "d_max_payload")]
    pub max_payload: usize,
    /// How long a publish (broadcast: until queued; stream: until the server accepted it),
    /// `flush` or a command waits for the server (default: 5s).
    #[serde(default = "d_publish_timeout")]
    pub publish_timeout: ConfigDuration,
    /// How long one connection attempt may take (default: 2s).
    #[serde(default = "d_connect_timeout")]
    pub connect_timeout: ConfigDuration,
    /// First reconnect delay; doubles per failed attempt, with jitter (default: 50ms).
    #[serde(default = "d_reconnect_min")]
    pub reconnect_min: ConfigDuration,
    /// Cap of the reconnect delay (default: 2s).
    #[serde(default = "d_reconnect_max")]
    pub reconnect_max: ConfigDuration,
    /// Most publishes sent in one pipeline (default: 1024).
    #[serde(default = "d_max_batch")]
    pub max_batch: usize,
    /// Publishes queued for the writer before `publish` waits for room (default: 8192).
    #[serde(default = "d_publish_queue")]
    pub publish_queue: usize,
    /// Stream mode: stream key = `key_prefix` + topic (default: `busway:stream:`).
    #[serde(default = "d_key_prefix")]
    pub key_prefix: String,
    /// Stream mode: the set of published topics, read by wildcard subscriptions
    /// (default: `busway:topics`).
    #[serde(default = "d_index_key")]
    pub index_key: String,
    /// Stream mode: `XADD MAXLEN ~ N`; 0 never trims (default: 100000).
    #[serde(default = "d_stream_maxlen")]
    pub stream_maxlen: u64,
    /// Stream mode: `XREADGROUP` / `XREAD` `BLOCK`; bounds how late a nack's redelivery
    /// and a rescan run (default: 500ms).
    #[serde(default = "d_read_block")]
    pub read_block: ConfigDuration,
    /// Stream mode: `XREADGROUP` / `XREAD` `COUNT` (default: 256).
    #[serde(default = "d_read_count")]
    pub read_count: usize,
    /// Stream mode: how often wildcard subscriptions rescan `index_key` and pending entries
    /// are checked for reclaiming (default: 1s).
    #[serde(default = "d_rescan_interval")]
    pub rescan_interval: ConfigDuration,
    /// Stream mode: reclaim entries pending longer than this; unset uses each
    /// subscription's ack timeout (default: unset).
    #[serde(default)]
    pub claim_idle: Option<ConfigDuration>,
    /// Stream mode: deliveries after which an entry is moved to `dead_letter` (default:
    /// unset, unlimited). Needs `dead_letter`.
    #[serde(default)]
    pub max_deliveries: Option<u32>,
    /// Stream mode: the topic that receives entries past `max_deliveries` (default: unset).
    #[serde(default)]
    pub dead_letter: Option<String>,
    /// Stream mode: a publish returns Ok only once this many replicas acknowledged it
    /// (`WAIT` after each pipeline of XADDs); 0 returns once the primary has it (default: 0).
    #[serde(default)]
    pub min_replicas: u32,
    /// Stream mode: how long the `WAIT` of `min_replicas` may take; less than
    /// `publish_timeout` (default: 1s).
    #[serde(default = "d_min_replicas_timeout")]
    pub min_replicas_timeout: ConfigDuration,
    /// `rediss://` only: a PEM file of the CA(s) that signed the server's certificate,
    /// instead of the system's trust store (default: unset).
    #[serde(default)]
    pub tls_ca: Option<String>,
    /// `rediss://` only: a PEM client certificate, for servers that verify clients
    /// (mutual TLS); needs `tls_key` (default: unset).
    #[serde(default)]
    pub tls_cert: Option<String>,
    /// `rediss://` only: the PEM private key of `tls_cert` (default: unset).
    #[serde(default)]
    pub tls_key: Option<String>,
    /// Stream mode: the consumer name of this process in a consumer group; `{app}`,
    /// `{group}` and `{bus}` are replaced, `{instance}` by the environment variable
    /// `BUSWAY_INSTANCE` (default: unset, `busway:<app>:<bus>:<random>`).
    #[serde(default)]
    pub consumer: Option<String>,
    /// Stream mode: an existing layout of stream keys and entry fields to read and write
    /// (default: unset, busway's own: `key_prefix` + topic and busway's fields).
    #[serde(default)]
    pub layout: Option<LayoutOptions>,
}

impl Default for RedisOptions {
    fn default() -> Self {
        // Same defaults as an empty config table.
        toml::Value::Table(toml::Table::new())
            .try_into()
            .expect("every RedisOptions field has a default")
    }
}

/// Everything a [`RedisBus`](crate::RedisBus) needs, typed: [`RedisConfig::new`] gives the
/// defaults of [`RedisOptions`], and the fields can be set one by one. `Debug` redacts the
/// URL's password.
///
/// ```
/// use std::time::Duration;
/// let mut config = busway_redis::RedisConfig::new("main", "redis://127.0.0.1:6379")
///     .mode(busway::Mode::Stream)
///     .app("pricing");
/// config.read_block = Duration::from_millis(100);
/// assert_eq!(config.publish_timeout, Duration::from_secs(5));
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub struct RedisConfig {
    /// The bus's name.
    pub bus: String,
    /// `redis://[user:password@]host[:port][/db]`, `rediss://...`, `redis+unix://`,
    /// `unix://`, `redis+sentinel://[user:password@]host:port,host:port/<master-name>` or
    /// `redis+cluster://[user:password@]host:port,host:port`.
    pub url: String,
    /// Broadcast or stream.
    pub mode: Mode,
    /// `CLIENT SETNAME` of every connection: `busway:<app>:<bus>`.
    pub client_name: String,
    /// Default queue settings of subscriptions.
    pub queue: QueueDefaults,
    /// The app name put in the `source` header of published messages.
    pub app: String,
    /// Broadcast-mode framing.
    pub framing: Framing,
    /// What a foreign payload on a busway-framed broadcast bus becomes.
    pub unframed: Unframed,
    /// Outage policy for publishes.
    pub on_disconnect: OnDisconnect,
    /// Publishes held while disconnected under [`OnDisconnect::Buffer`].
    pub publish_buffer: usize,
    /// Largest payload accepted, bytes.
    pub max_payload: usize,
    /// How long a publish, `flush` or a command waits for the server.
    pub publish_timeout: Duration,
    /// How long one connection attempt may take.
    pub connect_timeout: Duration,
    /// First reconnect delay; doubles per failed attempt, with jitter.
    pub reconnect_min: Duration,
    /// Cap of the reconnect delay.
    pub reconnect_max: Duration,
    /// Most publishes sent in one pipeline.
    pub max_batch: usize,
    /// Publishes queued for the writer before `publish` waits for room.
    pub publish_queue: usize,
    /// Stream mode: stream key = `key_prefix` + topic.
    pub key_prefix: String,
    /// Stream mode: the set of published topics, read by wildcard subscriptions.
    pub index_key: String,
    /// Stream mode: `XADD MAXLEN ~ N`; 0 never trims.
    pub stream_maxlen: u64,
    /// Stream mode: `XREADGROUP` / `XREAD` `BLOCK`.
    pub read_block: Duration,
    /// Stream mode: `XREADGROUP` / `XREAD` `COUNT`.
    pub read_count: usize,
    /// Stream mode: the wildcard rescan and reclaim period.
    pub rescan_interval: Duration,
    /// Stream mode: reclaim entries pending longer than this; `None` uses each
    /// subscription's ack timeout.
    pub claim_idle: Option<Duration>,
    /// Stream mode: deliveries after which an entry is moved to `dead_letter`.
    pub max_deliveries: Option<u32>,
    /// Stream mode: the topic that receives entries past `max_deliveries`.
    pub dead_letter: Option<String>,
    /// Stream mode: replicas that must hold a publish before it returns Ok (`WAIT`).
    pub min_replicas: u32,
    /// Stream mode: how long the `WAIT` of `min_replicas` may take.
    pub min_replicas_timeout: Duration,
    /// `rediss://` only: a PEM file of the CA(s) to trust instead of the system's.
    pub tls_ca: Option<String>,
    /// `rediss://` only: a PEM client certificate (with `tls_key`).
    pub tls_cert: Option<String>,
    /// `rediss://` only: the PEM private key of `tls_cert`.
    pub tls_key: Option<String>,
    /// Stream mode: the consumer name in a group, with `{app}`, `{group}`, `{bus}` and
    /// `{instance}` (`$BUSWAY_INSTANCE`) replaced; `None`: `busway:<app>:<bus>:<random>`.
    pub consumer: Option<String>,
    /// Stream mode: an existing layout of stream keys and entry fields; `None`: busway's.
    pub layout: Option<LayoutOptions>,
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("bus", &self.bus)
            .field("url", &self.redacted_url())
            .field("mode", &self.mode)
            .field("client_name", &self.client_name)
            .field("queue", &self.queue)
            .field("app", &self.app)
            .field("framing", &self.framing)
            .field("unframed", &self.unframed)
            .field("on_disconnect", &self.on_disconnect)
            .field("publish_buffer", &self.publish_buffer)
            .field("max_payload", &self.max_payload)
            .field("publish_timeout", &self.publish_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("reconnect_min", &self.reconnect_min)
            .field("reconnect_max", &self.reconnect_max)
            .field("max_batch", &self.max_batch)
            .field("publish_queue", &self.publish_queue)
            .field("key_prefix", &self.key_prefix)
            .field("index_key", &self.index_key)
            .field("stream_maxlen", &self.stream_maxlen)
            .field("read_block", &self.read_block)
            .field("read_count", &self.read_count)
            .field("rescan_interval", &self.rescan_interval)
            .field("claim_idle", &self.claim_idle)
            .field("max_deliveries", &self.max_deliveries)
            .field("dead_letter", &self.dead_letter)
            .field("min_replicas", &self.min_replicas)
            .field("min_replicas_timeout", &self.min_replicas_timeout)
            .field("tls_ca", &self.tls_ca)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("consumer", &self.consumer)
            .field("layout", &self.layout)
            .finish()
    }
}

impl RedisConfig {
    /// A broadcast bus named `bus` on `url` with default options (app `busway`).
    pub fn new(bus: impl Into<String>, url: impl Into<String>) -> RedisConfig {
        RedisConfig::with_options(bus.into(), url.into(), RedisOptions::default())
    }

    /// A broadcast bus of app `busway` with options `o`.
    fn with_options(bus: String, url: String, o: RedisOptions) -> RedisConfig {
        RedisConfig {
            client_name: format!("busway:busway:{bus}"),
            bus,
            url,
            mode: Mode::Broadcast,
            queue: QueueDefaults::default(),
            app: "busway".to_string(),
            framing: o.framing,
            unframed: o.unframed,
            on_disconnect: o.on_disconnect,
            publish_buffer: o.publish_buffer,
            max_payload: o.max_payload,
            publish_timeout: o.publish_timeout.0,
            connect_timeout: o.connect_timeout.0,
            reconnect_min: o.reconnect_min.0,
            reconnect_max: o.reconnect_max.0,
            max_batch: o.max_batch,
            publish_queue: o.publish_queue,
            key_prefix: o.key_prefix,
            index_key: o.index_key,
            stream_maxlen: o.stream_maxlen,
            read_block: o.read_block.0,
            read_count: o.read_count,
            rescan_interval: o.rescan_interval.0,
            claim_idle: o.claim_idle.map(|d| d.0),
            max_deliveries: o.max_deliveries,
            dead_letter: o.dead_letter,
            min_replicas: o.min_replicas,
            min_replicas_timeout: o.min_replicas_timeout.0,
            tls_ca: o.tls_ca,
            tls_cert: o.tls_cert,
            tls_key: o.tls_key,
            consumer: o.consumer,
            layout: o.layout,
        }
    }

    /// Sets the mode.
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Sets the app name (and with it the client name `busway:<app>:<bus>`).
    pub fn app(mut self, app: impl Into<String>) -> Self {
        self.app = app.into();
        self.client_name = format!("busway:{}:{}", self.app, self.bus);
        self
    }

    /// Sets every Redis-specific option from config keys; the bus's identity (name, URL,
    /// mode, app, client name, queue defaults) stays.
    pub fn options(self, o: RedisOptions) -> Self {
        RedisConfig {
            bus: self.bus,
            url: self.url,
            mode: self.mode,
            client_name: self.client_name,
            queue: self.queue,
            app: self.app,
            ..RedisConfig::with_options(String::new(), String::new(), o)
        }
    }

    /// Reads a bus's config as the registry hands it over, and checks it without
    /// connecting: whatever [`RedisBus::connect`](crate::RedisBus::connect) would refuse for
    /// its config is refused here, so `validate` and `build` give the same error.
    ///
    /// # Errors
    /// `InvalidConfig` naming the file and `buses.<bus>.<key>`: a renamed key (naming its new
    /// name), an unknown key, a bad value, a missing `url` or one that is not a Redis URL or
    /// does not parse, `tls_*` without `rediss://` or an unreadable TLS file,
    /// `framing = "raw"` in stream mode, `max_deliveries` without `dead_letter`, an invalid
    /// `dead_letter` topic.
    pub fn from_context(ctx: &BuildContext<'_>) -> Result<RedisConfig> {
        ctx.check_renamed(RENAMED)?;
        let options: RedisOptions = ctx.options()?;
        let url = ctx.config.url.clone().ok_or_else(|| {
            ctx.config_error(
                "url",
                "is required for the redis transport (redis://host:port)",
            )
        })?;
        let mut config = RedisConfig::new(ctx.bus, url)
            .mode(ctx.config.mode)
            .app(ctx.app)
            .options(options);
        config.client_name = ctx.client_name();
        config.queue = ctx.config.queue_defaults();
        config
            .problem()
            .map_or(Ok(config), |(key, why)| Err(ctx.config_error(key, why)))
    }

    /// Checks the config as [`from_context`](Self::from_context) does, for a config built
    /// in code.
    ///
    /// # Errors
    /// `InvalidConfig`: `bus "<bus>": <key>: <why>`.
    pub fn validate(&self) -> Result<()> {
        match self.problem() {
            None => Ok(()),
            Some((key, why)) => Err(Error::config(format!("bus {:?}: {key}: {why}", self.bus))),
        }
    }

    /// The first problem of the config, as `(key, reason)`.
    fn problem(&self) -> Option<(&'static str, String)> {
        if let Err(why) = check_url(&self.url) {
            return Some(("url", why));
        }
        if self.mode == Mode::Stream && self.is_cluster() {
            return Some((
                "mode",
                "stream mode is not supported on a Redis Cluster (redis+cluster://): a reader's blocking XREADGROUP over all of its keys would cross hash slots; use broadcast mode (sharded pub/sub) or a one-server / Sentinel URL".into(),
            ));
        }
        if self.mode == Mode::Stream && self.framing == Framing::Raw {
            return Some((
                "framing",
                "\"raw\" applies to broadcast mode; stream mode carries headers as stream fields"
                    .into(),
            ));
        }
        if self.unframed == Unframed::Deliver
            && (self.mode == Mode::Stream || self.framing == Framing::Raw)
        {
            return Some((
                "unframed",
                "\"deliver\" applies to broadcast mode with framing = \"busway\" (raw framing \
                 delivers every payload as it is; stream mode reads fields)"
                    .into(),
            ));
        }
        if self.max_deliveries.is_some() && self.dead_letter.is_none() {
            return Some((
                "max_deliveries",
                "needs dead_letter (the topic that receives entries past the limit)".into(),
            ));
        }
        if let Some(t) = &self.dead_letter {
            match Topic::new(t) {
                Err(e) => return Some(("dead_letter", e.to_string())),
                Ok(t) => {
                    let layout = self.layout.as_ref().and_then(|l| Layout::new(l).ok());
                    if layout.is_some_and(|l| !l.maps(&t)) {
                        return Some((
                            "dead_letter",
                            format!("topic {:?} falls in no layout.streams topic", t.as_str()),
                        ));
                    }
                }
            }
        }
        if let Some(layout) = &self.layout {
            if self.mode != Mode::Stream {
                return Some((
                    "layout",
                    "applies to stream mode (mode = \"stream\"); broadcast channels are topics"
                        .into(),
                ));
            }
            if let Err(why) = Layout::new(layout) {
                return Some(("layout", why));
            }
            // Ignored under a layout: refused rather than silently unused.
            for (key, value, default) in [
                ("key_prefix", &self.key_prefix, d_key_prefix()),
                ("index_key", &self.index_key, d_index_key()),
            ] {
                if *value != default {
                    return Some((
                        key,
                        "does not apply with a layout (its streams give the keys; no index is kept)"
                            .into(),
                    ));
                }
            }
        }
        if let Some(c) = &self.consumer {
            if let Err(why) = check_consumer(c) {
                return Some(("consumer", why));
            }
            if c.contains("{instance}") {
                if let Err(why) = instance() {
                    return Some(("consumer", format!("{c:?} uses {{instance}}, but {why}")));
                }
            }
            if self.mode != Mode::Stream {
                return Some((
                    "consumer",
                    "applies to stream mode (consumer groups)".into(),
                ));
            }
        }
        if self.min_replicas > 0 && self.mode != Mode::Stream {
            return Some((
                "min_replicas",
                "applies to stream mode only (broadcast messages are not stored, so there is nothing for replicas to hold)".into(),
            ));
        }
        if self.min_replicas > 0 && self.min_replicas_timeout.is_zero() {
            return Some((
                "min_replicas_timeout",
                "must be more than 0 (WAIT 0 would wait forever)".into(),
            ));
        }
        if self.min_replicas > 0 && self.min_replicas_timeout >= self.publish_timeout {
            return Some((
                "min_replicas_timeout",
                format!(
                    "must be less than publish_timeout ({:?}): a publish would time out before its WAIT answers",
                    self.publish_timeout
                ),
            ));
        }
        for (key, value) in [
            ("max_batch", self.max_batch),
            ("publish_queue", self.publish_queue),
            ("read_count", self.read_count),
        ] {
            if value == 0 {
                return Some((key, "must be at least 1".into()));
            }
        }
        if self.key_prefix.is_empty() {
            return Some(("key_prefix", "must not be empty".into()));
        }
        let tls_files = [
            ("tls_ca", &self.tls_ca),
            ("tls_cert", &self.tls_cert),
            ("tls_key", &self.tls_key),
        ];
        let (key, _) = tls_files.iter().find(|(_, path)| path.is_some())?;
        if !self.url.starts_with("rediss://") {
            return Some((
                key,
                format!(
                    "applies to rediss:// URLs only; the url is {:?}",
                    self.redacted_url()
                ),
            ));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Some((
                "tls_cert",
                "tls_cert and tls_key go together (a client certificate and its key)".into(),
            ));
        }
        for (key, path) in tls_files {
            if let Some(path) = path {
                // Read as `connect` reads it, so `busway check` finds a missing file too.
                if let Err(e) = std::fs::read(path) {
                    return Some((key, format!("cannot read {path:?}: {e}")));
                }
            }
        }
        None
    }

    /// Whether the URL names a Redis Cluster (`redis+cluster://`).
    pub(crate) fn is_cluster(&self) -> bool {
        crate::cluster::is_cluster_url(&self.url)
    }

    /// What a bus with this config can do.
    pub(crate) fn capabilities(&self) -> Capabilities {
        let max = self.max_payload;
        match self.mode {
            Mode::Broadcast => {
                let mut c = Capabilities::broadcast(max);
                // Groups are refused rather than emulated: Redis pub/sub has no competing
                // consumers; stream mode has real ones.
                c.groups = false;
                let framed = self.framing == Framing::Busway;
                c.headers = framed;
                c.request_reply = framed;
                // Sharded pub/sub has no patterns.
                c.wildcards = !self.is_cluster();
                c
            }
            Mode::Stream => Capabilities::stream(max),
        }
    }

    /// The consumer name of this process in `group`: `consumer` with its placeholders
    /// replaced, or `busway:<app>:<bus>:<random>`.
    pub(crate) fn consumer_name(&self, group: &str) -> String {
        match &self.consumer {
            Some(c) => c
                .replace("{app}", &self.app)
                .replace("{group}", group)
                .replace("{bus}", &self.bus)
                .replace("{instance}", &instance().unwrap_or_default()),
            None => format!("{}:{:016x}", self.client_name, rand::random::<u64>()),
        }
    }

    /// `publish_timeout`, at least 1ms.
    pub(crate) fn response_timeout(&self) -> Duration {
        self.publish_timeout.max(Duration::from_millis(1))
    }

    /// The URL with its password replaced, for messages.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }
}

/// `BUSWAY_INSTANCE`: this process's instance (a number or name), for `{instance}` in
/// `consumer`.
fn instance() -> std::result::Result<String, String> {
    match std::env::var("BUSWAY_INSTANCE") {
        Ok(v) if !v.is_empty() && v.bytes().all(|b| b.is_ascii_graphic()) => Ok(v),
        Ok(v) => Err(format!(
            "BUSWAY_INSTANCE {v:?} is empty or holds spaces or control characters"
        )),
        Err(_) => Err("BUSWAY_INSTANCE is not set (this process's instance number or name)".into()),
    }
}

/// Why a consumer name template cannot be used.
fn check_consumer(c: &str) -> std::result::Result<(), String> {
    if c.is_empty() {
        return Err("must not be empty".into());
    }
    let mut rest = c;
    while let Some(start) = rest.find('{') {
        let end = rest[start..]
            .find('}')
            .ok_or_else(|| format!("{c:?} has a '{{' without '}}'"))?;
        let name = &rest[start..start + end + 1];
        if !matches!(name, "{app}" | "{group}" | "{bus}" | "{instance}") {
            return Err(format!(
                "{c:?}: {name} is not one of {{app}}, {{group}}, {{bus}}, {{instance}}"
            ));
        }
        rest = &rest[start + end + 1..];
    }
    if c.bytes()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(format!("{c:?} holds whitespace or a control character"));
    }
    Ok(())
}

/// Why a URL cannot be used, without echoing its password.
fn check_url(url: &str) -> std::result::Result<(), String> {
    let shown = redact_url(url);
    let scheme = url.split("://").next().unwrap_or("");
    match scheme {
        "redis+sentinel" => {
            return crate::sentinel::SentinelUrl::parse(url)
                .map(drop)
                .map_err(|why| format!("{shown:?}: {}", scrub_secrets(&why, url)));
        }
        "redis+cluster" => {
            return crate::cluster::node_infos(url)
                .map(drop)
                .map_err(|why| format!("{shown:?}: {}", scrub_secrets(&why, url)));
        }
        "redis" | "redis+unix" | "unix" => {}
        "rediss" if cfg!(feature = "tls") => {}
        "rediss" => {
            return Err(format!(
                "{shown:?} uses TLS, but busway-redis was built without its `tls` feature"
            ))
        }
        _ => {
            return Err(format!(
                "{shown:?} is not a redis URL; expected redis://[user:password@]host[:port][/db], rediss://, redis+sentinel://host:port,host:port/<master-name> or redis+cluster://host:port,host:port"
            ))
        }
    }
    redis::Client::open(url).map(drop).map_err(|e| {
        format!(
            "{shown:?} cannot be parsed: {}",
            scrub_secrets(&e.to_string(), url)
        )
    })
}
