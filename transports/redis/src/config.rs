//! The Redis bus's settings: the shared [`BusConfig`](busway::config::BusConfig) keys plus the
//! Redis-specific keys below (all optional; unknown keys are an error).
//!
//! ```toml
//! [buses.engine]
//! transport = "redis"
//! url = "redis://user:password@127.0.0.1:6379/0"   # rediss:// with the `tls` feature
//! mode = "stream"
//! framing = "busway"          # broadcast mode: busway (headers in a frame) | raw (payload alone)
//! on_disconnect = "buffer"    # buffer | fail: what publish does while the server is away
//! buffer_max = 10000          # publishes held while disconnected before BufferFull
//! stream_maxlen = 100000      # XADD MAXLEN ~ N per stream key; 0 keeps everything
//! key_prefix = "busway:stream:"  # stream key = key_prefix + topic
//! index_key = "busway:topics" # set of topics published in stream mode (wildcard discovery)
//! claim_idle_ms = 30000       # reclaim entries pending longer than this (default: ack timeout)
//! max_deliveries = 5          # after this many deliveries an entry goes to dead_letter
//! dead_letter = "engine.dead" # topic (on this bus) for entries that failed max_deliveries
//! tls_ca = "/etc/busway/ca.pem"  # rediss:// only: trust this CA instead of the system's
//! tls_cert = "client.pem"     # rediss:// only: client certificate (mutual TLS), with tls_key
//! tls_key = "client.key"
//! ```

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use busway::transport::{redact_url, scrub_secrets, Framing, OnDisconnect};
use busway::{config::QueueDefaults, transport::BuildContext, Capabilities, Mode, Result, Topic};

fn d_buffer_max() -> usize {
    10_000
}
fn d_max_payload() -> usize {
    64 * 1024 * 1024
}
fn d_response_timeout_ms() -> u64 {
    5_000
}
fn d_connect_timeout_ms() -> u64 {
    2_000
}
fn d_reconnect_min_ms() -> u64 {
    50
}
fn d_reconnect_max_ms() -> u64 {
    2_000
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
fn d_block_ms() -> u64 {
    500
}
fn d_read_count() -> usize {
    256
}
fn d_rescan_ms() -> u64 {
    1_000
}

/// The Redis-specific keys of a bus config. Every field has a default (shown in brackets).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RedisOptions {
    /// Broadcast-mode framing (default: `busway`).
    #[serde(default)]
    pub framing: Framing,
    /// Outage policy for publishes (default: `buffer`).
    #[serde(default)]
    pub on_disconnect: OnDisconnect,
    /// Publishes held while disconnected under `buffer` (default: 10000).
    #[serde(default = "d_buffer_max")]
    pub buffer_max: usize,
    /// Largest payload accepted, bytes (default: 64 MiB).
    #[serde(default = "d_max_payload")]
    pub max_payload: usize,
    /// How long a command (or a stream publish, or `flush`) may wait for the server
    /// (default: 5000).
    #[serde(default = "d_response_timeout_ms")]
    pub response_timeout_ms: u64,
    /// How long one connection attempt may take (default: 2000).
    #[serde(default = "d_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// First reconnect delay; doubles per failed attempt, with jitter (default: 50).
    #[serde(default = "d_reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    /// Cap of the reconnect delay (default: 2000).
    #[serde(default = "d_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
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
    /// Stream mode: `XREADGROUP BLOCK` milliseconds; bounds how late a nack's redelivery
    /// and a rescan run (default: 500).
    #[serde(default = "d_block_ms")]
    pub block_ms: u64,
    /// Stream mode: `XREADGROUP COUNT` (default: 256).
    #[serde(default = "d_read_count")]
    pub read_count: usize,
    /// Stream mode: how often wildcard subscriptions rescan `index_key` and pending entries
    /// are checked for reclaiming (default: 1000).
    #[serde(default = "d_rescan_ms")]
    pub rescan_ms: u64,
    /// Stream mode: reclaim entries pending longer than this; unset uses each
    /// subscription's ack timeout (default: unset).
    #[serde(default)]
    pub claim_idle_ms: Option<u64>,
    /// Stream mode: deliveries after which an entry is moved to `dead_letter` (default:
    /// unset, unlimited). Needs `dead_letter`.
    #[serde(default)]
    pub max_deliveries: Option<u32>,
    /// Stream mode: the topic that receives entries past `max_deliveries` (default: unset).
    #[serde(default)]
    pub dead_letter: Option<String>,
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
}

impl Default for RedisOptions {
    fn default() -> Self {
        // Same defaults as an empty config table.
        toml::Value::Table(toml::Table::new())
            .try_into()
            .expect("every RedisOptions field has a default")
    }
}

/// Everything a [`RedisBus`](crate::RedisBus) needs. `Debug` redacts the URL's password.
#[derive(Clone)]
#[non_exhaustive]
pub struct RedisConfig {
    /// The bus's name.
    pub bus: String,
    /// `redis://[user:password@]host[:port][/db]` or `rediss://...`.
    pub url: String,
    /// Broadcast or stream.
    pub mode: Mode,
    /// `CLIENT SETNAME` of every connection: `busway:<app>:<bus>`.
    pub client_name: String,
    /// Default queue settings of subscriptions.
    pub queue: QueueDefaults,
    /// The Redis-specific options.
    pub options: RedisOptions,
    /// The app name put in the `source` header of published messages.
    pub app: String,
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("bus", &self.bus)
            .field("url", &redact_url(&self.url))
            .field("mode", &self.mode)
            .field("client_name", &self.client_name)
            .field("queue", &self.queue)
            .field("options", &self.options)
            .finish()
    }
}

impl RedisConfig {
    /// A broadcast bus named `bus` on `url` with default options (app `busway`).
    pub fn new(bus: impl Into<String>, url: impl Into<String>) -> RedisConfig {
        let bus = bus.into();
        RedisConfig {
            client_name: format!("busway:busway:{bus}"),
            bus,
            url: url.into(),
            mode: Mode::Broadcast,
            queue: QueueDefaults::default(),
            options: RedisOptions::default(),
            app: "busway".to_string(),
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

    /// Replaces the Redis-specific options.
    pub fn options(mut self, options: RedisOptions) -> Self {
        self.options = options;
        self
    }

    /// Reads a bus's config as the registry hands it over.
    ///
    /// # Errors
    /// `InvalidConfig` naming the file and `buses.<bus>.<key>`: a missing or unparsable
    /// `url`, an unknown key, a bad value, `framing = "raw"` in stream mode,
    /// `max_deliveries` without `dead_letter`, an invalid `dead_letter` topic.
    pub fn from_context(ctx: &BuildContext<'_>) -> Result<RedisConfig> {
        let options: RedisOptions = ctx.options()?;
        let url = ctx.config.url.clone().ok_or_else(|| {
            ctx.config_error(
                "url",
                "is required for the redis transport (redis://host:port)",
            )
        })?;
        check_url(&url).map_err(|why| ctx.config_error("url", why))?;
        let config = RedisConfig {
            bus: ctx.bus.to_string(),
            url,
            mode: ctx.config.mode,
            client_name: ctx.client_name(),
            queue: ctx.config.queue_defaults(),
            options,
            app: ctx.app.to_string(),
        };
        config
            .check()
            .map_err(|(key, why)| ctx.config_error(key, why))?;
        Ok(config)
    }

    /// Cross-field checks: `(key, reason)` of the first problem.
    pub(crate) fn check(&self) -> std::result::Result<(), (&'static str, String)> {
        let o = &self.options;
        if self.mode == Mode::Stream && o.framing == Framing::Raw {
            return Err((
                "framing",
                "\"raw\" applies to broadcast mode; stream mode carries headers as stream fields"
                    .into(),
            ));
        }
        if o.max_deliveries.is_some() && o.dead_letter.is_none() {
            return Err((
                "max_deliveries",
                "needs dead_letter (the topic that receives entries past the limit)".into(),
            ));
        }
        if let Some(t) = &o.dead_letter {
            Topic::new(t).map_err(|e| ("dead_letter", e.to_string()))?;
        }
        if o.max_batch == 0 || o.publish_queue == 0 || o.read_count == 0 {
            return Err((
                "max_batch",
                "max_batch, publish_queue and read_count must be at least 1".into(),
            ));
        }
        if o.key_prefix.is_empty() {
            return Err(("key_prefix", "must not be empty".into()));
        }
        let tls_key_set = o.tls_ca.is_some() || o.tls_cert.is_some() || o.tls_key.is_some();
        if tls_key_set && !self.url.starts_with("rediss://") {
            let key = match (&o.tls_ca, &o.tls_cert) {
                (Some(_), _) => "tls_ca",
                (None, Some(_)) => "tls_cert",
                (None, None) => "tls_key",
            };
            return Err((
                key,
                format!(
                    "applies to rediss:// URLs only; the url is {:?}",
                    self.redacted_url()
                ),
            ));
        }
        if o.tls_cert.is_some() != o.tls_key.is_some() {
            return Err((
                "tls_cert",
                "tls_cert and tls_key go together (a client certificate and its key)".into(),
            ));
        }
        Ok(())
    }

    /// What a bus with this config can do.
    pub(crate) fn capabilities(&self) -> Capabilities {
        let max = self.options.max_payload;
        match self.mode {
            Mode::Broadcast => {
                let mut c = Capabilities::broadcast(max);
                // Groups are refused rather than emulated: Redis pub/sub has no competing
                // consumers; stream mode has real ones.
                c.groups = false;
                let framed = self.options.framing == Framing::Busway;
                c.headers = framed;
                c.request_reply = framed;
                c
            }
            Mode::Stream => Capabilities::stream(max),
        }
    }

    pub(crate) fn response_timeout(&self) -> Duration {
        Duration::from_millis(self.options.response_timeout_ms.max(1))
    }

    /// The URL with its password replaced, for messages.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }
}

/// Why a URL cannot be used, without echoing its password.
pub(crate) fn check_url(url: &str) -> std::result::Result<(), String> {
    let shown = redact_url(url);
    let scheme = url.split("://").next().unwrap_or("");
    match scheme {
        "redis" | "redis+unix" | "unix" => {}
        "rediss" if cfg!(feature = "tls") => {}
        "rediss" => {
            return Err(format!(
                "{shown:?} uses TLS, but busway-redis was built without its `tls` feature"
            ))
        }
        _ => {
            return Err(format!(
                "{shown:?} is not a redis URL; expected redis://[user:password@]host[:port][/db] or rediss://"
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
