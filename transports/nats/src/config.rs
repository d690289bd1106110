//! A NATS bus's settings: the NATS keys of `[buses.<name>]` ([`NatsOptions`]) and everything
//! [`NatsBus::connect`](crate::NatsBus::connect) needs ([`NatsConfig`]).
//!
//! ```toml
//! [buses.marketdata]
//! transport = "nats"
//! url = "nats://10.0.0.1:4222,nats://10.0.0.2:4222"   # one or several servers
//! framing = "busway"           # or "raw": payload only, for non-busway peers
//! on_disconnect = "buffer"     # or "fail"
//! token = "s3cret"             # or user + password, creds, nkey
//!
//! [buses.engine]
//! transport = "nats"
//! mode = "stream"              # JetStream
//! url = "nats://10.0.0.1:4222"
//! stream = "ENGINE"            # default: BUSWAY_<BUS> upper-cased
//! subjects = ["engine.>"]      # default: ["<bus>.>"]; set, the stream has them from connect
//! durable = "{group}-{hash}"   # a group's durable consumer name (the default)
//! max_age = "7d"
//! max_deliveries = 5
//! dead_letter = "dead.engine"
//! ```
//!
//! [`NatsConfig::from_context`] refuses everything that can be refused without a server:
//! unknown and renamed keys, bad values, URLs that are not NATS URLs, inconsistent
//! credentials, unreadable credential and TLS files, and (in stream mode) bad stream names,
//! subjects and dead-letter topics.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use async_nats::ServerAddr;
use busway::config::QueueDefaults;
use busway::transport::{
    redact_url, split_userinfo, BuildContext, ConfigDuration, Framing, OnDisconnect,
};
use busway::{Mode, Pattern, Result, Topic};
use serde::Deserialize;

/// Keys that were renamed: `(old, new)`. [`NatsConfig::from_context`] refuses the old name,
/// naming the new one.
pub const RENAMED: &[(&str, &str)] = &[("max_deliver", "max_deliveries")];

/// The server a bus without `url` connects to.
pub const DEFAULT_URL: &str = "nats://127.0.0.1:4222";

/// JetStream storage of the bus's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Storage {
    /// On disk (survives a server restart).
    #[default]
    File,
    /// In memory.
    Memory,
}

/// The NATS keys of a bus. Every key is optional; unknown keys are an error.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsOptions {
    /// `busway` (default: busway headers as NATS headers) or `raw` (the payload alone).
    #[serde(default)]
    pub framing: Framing,
    /// `buffer` (default) or `fail`. Under `buffer`, publishes wait in async-nats's command
    /// buffer (`publish_buffer` operations) and go out on reconnect; when it is full,
    /// `publish` waits up to `publish_timeout`, then fails with `ErrorKind::BufferFull`. A
    /// broadcast message buffered this way is lost if the process exits before the
    /// connection returns.
    #[serde(default)]
    pub on_disconnect: OnDisconnect,
    /// How long a publish may wait for buffer room (and, in stream mode, for the PubAck).
    /// Default 5 s.
    #[serde(default)]
    pub publish_timeout: Option<ConfigDuration>,
    /// How long connecting (and each reconnect attempt) may take. Default 5 s.
    #[serde(default)]
    pub connect_timeout: Option<ConfigDuration>,
    /// async-nats's per-subscription channel, in messages, between the connection reader and
    /// busway's pump task (one setting for the whole connection). Default: the bus's queue
    /// capacity, at least 65,536 (async-nats's own default), so under `block` the channel
    /// alone can hold a full subscription queue's worth while the pump catches up. The
    /// channel allocates as it fills: the cost is memory only while a backlog exists (at
    /// most queue capacity + `client_capacity` messages per subscription under `block`).
    /// Messages arriving while it is full are dropped by the client and counted in
    /// `dropped`.
    #[serde(default)]
    pub client_capacity: Option<usize>,
    /// Bytes one `block` subscription may hold in the process: its queue and what its pump
    /// took from the client and could not queue yet (core NATS), or its queue and what its
    /// pull asked the server for (JetStream). Past it, core NATS drops (counted in
    /// `dropped`, logged at warn) and JetStream stops pulling, so the rest stays on the
    /// server. Counted as payload + headers + 256 bytes of bookkeeping per message. Default
    /// 64 MiB. The count bounds (`capacity`, `client_capacity`, `prefetch`) still apply.
    #[serde(default)]
    pub max_pending_bytes: Option<usize>,
    /// async-nats's command buffer, in operations (publishes waiting to be written, also
    /// while disconnected). Default 8,192.
    #[serde(default)]
    pub publish_buffer: Option<usize>,
    /// Give up reconnecting after this many attempts (default: never give up).
    #[serde(default)]
    pub max_reconnects: Option<usize>,
    /// How often the client PINGs the server; two unanswered PINGs close the connection and
    /// async-nats reconnects (to another server of a cluster). It bounds how long a frozen
    /// server (alive but not answering) holds the bus. Default 10 s.
    #[serde(default)]
    pub ping_interval: Option<ConfigDuration>,

    /// User name (with `password`).
    #[serde(default)]
    pub user: Option<String>,
    /// Password (with `user`). Never printed.
    #[serde(default)]
    pub password: Option<String>,
    /// Auth token. Never printed.
    #[serde(default)]
    pub token: Option<String>,
    /// Path of a `.creds` file (JWT + NKey seed). Never printed.
    #[serde(default)]
    pub creds: Option<PathBuf>,
    /// NKey seed (`SU...`). Never printed.
    #[serde(default)]
    pub nkey: Option<String>,
    /// PEM file of the CA that signed the server's certificate.
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate (with `tls_key`) for mutual TLS.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// PEM client key (with `tls_cert`).
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Refuse to talk to a server without TLS. Default false (implied by `tls_*` files and
    /// `tls://` URLs).
    #[serde(default)]
    pub tls_required: bool,

    /// Stream mode: the JetStream stream's name. Default `BUSWAY_<BUS>` (upper-cased,
    /// `-` as `_`).
    #[serde(default)]
    pub stream: Option<String>,
    /// Stream mode: the subjects the stream captures. Default `["<bus>.>"]`, growing with
    /// use.
    #[serde(default)]
    pub subjects: Option<Vec<String>>,
    /// Stream mode: keep at most this many messages (oldest removed first). Default: no limit.
    #[serde(default)]
    pub max_msgs: Option<i64>,
    /// Stream mode: keep at most this many bytes. Default: no limit.
    #[serde(default)]
    pub max_bytes: Option<i64>,
    /// Stream mode: remove messages older than this. Default: no limit.
    #[serde(default)]
    pub max_age: Option<ConfigDuration>,
    /// Stream mode: `file` (default) or `memory`.
    #[serde(default)]
    pub storage: Storage,
    /// Stream mode: replicas of the stream (1 to 5; more than 1 needs a JetStream cluster).
    /// Default 1.
    #[serde(default)]
    pub replicas: Option<usize>,
    /// Stream mode: how long the stream remembers a message id (`Nats-Msg-Id`) to drop a
    /// second publish of it. Default: the server's (2 minutes).
    #[serde(default)]
    pub duplicate_window: Option<ConfigDuration>,
    /// Stream mode: when the stream exists with settings other than the configured ones,
    /// change it to the configured ones (`storage` cannot change). Default false: it is used
    /// as it is and a warning names the keys that differ.
    #[serde(default)]
    pub update_stream: bool,
    /// Stream mode: the durable consumer name of a group reading a pattern; `{group}` (with
    /// characters NATS refuses in names as `_`), `{hash}` (FNV-1a-32 of the pattern, 8 hex
    /// digits) and `{bus}` are replaced. Default `{group}-{hash}`. Without `{hash}` a group
    /// reads one pattern (the consumer's filter).
    #[serde(default)]
    pub durable: Option<String>,
    /// Stream mode: times a publish whose PubAck did not come (timeout, lost connection, no
    /// stream leader) is sent again, with the same `Nats-Msg-Id`, so the stream stores it
    /// once within `duplicate_window`. Default 3; 0 = no retry.
    #[serde(default)]
    pub publish_retries: Option<u32>,
    /// Stream mode: wait before the first retry, doubled for each next one (at most 2 s).
    /// Default 100 ms.
    #[serde(default)]
    pub retry_backoff: Option<ConfigDuration>,
    /// Stream mode: deliveries of one message before it is given up: published to
    /// `dead_letter`. Default unlimited (0 also means redeliver forever); set, it needs
    /// `dead_letter`, so a message is never given up silently.
    #[serde(default)]
    pub max_deliveries: Option<u32>,
    /// Stream mode: where messages go after `max_deliveries` failed deliveries.
    #[serde(default)]
    pub dead_letter: Option<String>,
    /// Stream mode: messages one pull asks the server for ahead of the handlers, per
    /// subscription. Default: the subscription's queue capacity, at most 256. What a
    /// subscription prefetched and no handler took is nak'd when it is dropped or the bus
    /// closes, so the server redelivers it at once.
    #[serde(default)]
    pub prefetch: Option<usize>,
}

impl NatsOptions {
    /// The publish timeout (default 5 s).
    pub fn publish_timeout(&self) -> Duration {
        self.publish_timeout.map_or(Duration::from_secs(5), |d| d.0)
    }

    /// The connect timeout (default 5 s).
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout.map_or(Duration::from_secs(5), |d| d.0)
    }

    /// The async-nats subscription channel size for a bus whose queue capacity is
    /// `queue_capacity`: `client_capacity` if set, else the queue capacity but at least
    /// 65,536. Never above what a tokio channel accepts.
    pub fn client_capacity(&self, queue_capacity: usize) -> usize {
        self.client_capacity
            .unwrap_or_else(|| queue_capacity.max(65_536))
            .clamp(1, MAX_CLIENT_CAPACITY)
    }

    /// The client's PING interval (default 10 s).
    pub fn ping_interval(&self) -> Duration {
        self.ping_interval.map_or(Duration::from_secs(10), |d| d.0)
    }

    /// Stream mode: retries of a publish that was not acknowledged (default 3).
    pub fn publish_retries(&self) -> u32 {
        self.publish_retries.unwrap_or(3)
    }

    /// Stream mode: the wait before retry `n` (1-based): `retry_backoff` (default 100 ms)
    /// doubled for each retry after the first, at most 2 s.
    pub fn retry_backoff(&self, n: u32) -> Duration {
        let base = self
            .retry_backoff
            .map_or(Duration::from_millis(100), |d| d.0);
        base.saturating_mul(1 << n.saturating_sub(1).min(16))
            .min(Duration::from_secs(2).max(base))
    }

    /// Bytes one `block` subscription may hold in the process (default 64 MiB, at least 1).
    pub fn max_pending_bytes(&self) -> usize {
        self.max_pending_bytes.unwrap_or(64 << 20).max(1)
    }

    /// async-nats's command buffer, in operations (default 8,192).
    pub fn publish_buffer(&self) -> usize {
        self.publish_buffer.unwrap_or(8192).max(1)
    }

    /// Messages a pull asks for ahead of the handlers, for a subscription whose queue holds
    /// `queue_capacity`: `prefetch` if set, else the queue capacity but at most 256.
    pub fn prefetch(&self, queue_capacity: usize) -> usize {
        self.prefetch
            .unwrap_or_else(|| queue_capacity.min(256))
            .max(1)
    }

    /// The deliveries of one message before it is given up (default 0 = unlimited).
    pub fn max_deliveries(&self) -> u32 {
        self.max_deliveries.unwrap_or(0)
    }
}

/// tokio's bounded channels refuse more than `usize::MAX >> 3` permits; stay far below.
const MAX_CLIENT_CAPACITY: usize = usize::MAX >> 4;

fn secret(v: &Option<impl Sized>) -> Option<&'static str> {
    v.as_ref().map(|_| "***")
}

impl fmt::Debug for NatsOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsOptions")
            .field("framing", &self.framing)
            .field("on_disconnect", &self.on_disconnect)
            .field("publish_timeout", &self.publish_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("client_capacity", &self.client_capacity)
            .field("max_pending_bytes", &self.max_pending_bytes)
            .field("publish_buffer", &self.publish_buffer)
            .field("max_reconnects", &self.max_reconnects)
            .field("ping_interval", &self.ping_interval)
            .field("user", &self.user)
            .field("password", &secret(&self.password))
            .field("token", &secret(&self.token))
            .field("creds", &secret(&self.creds))
            .field("nkey", &secret(&self.nkey))
            .field("tls_ca", &self.tls_ca)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("tls_required", &self.tls_required)
            .field("stream", &self.stream)
            .field("subjects", &self.subjects)
            .field("max_msgs", &self.max_msgs)
            .field("max_bytes", &self.max_bytes)
            .field("max_age", &self.max_age)
            .field("storage", &self.storage)
            .field("replicas", &self.replicas)
            .field("duplicate_window", &self.duplicate_window)
            .field("update_stream", &self.update_stream)
            .field("durable", &self.durable)
            .field("publish_retries", &self.publish_retries)
            .field("retry_backoff", &self.retry_backoff)
            .field("max_deliveries", &self.max_deliveries)
            .field("dead_letter", &self.dead_letter)
            .field("prefetch", &self.prefetch)
            .finish()
    }
}

/// Everything a [`NatsBus`](crate::NatsBus) needs. `Debug` shows the URL redacted and no
/// secret.
#[derive(Clone)]
#[non_exhaustive]
pub struct NatsConfig {
    /// The bus's name.
    pub bus: String,
    /// One or several comma-separated server URLs (`nats://`, `tls://`, `ws://`, `wss://`),
    /// credentials in the userinfo allowed (`nats://user:pass@host`, `nats://token@host`).
    pub url: String,
    /// Broadcast (core NATS) or stream (JetStream).
    pub mode: Mode,
    /// The app name; the connection is named `busway:<app>:<bus>`.
    pub app: String,
    /// Default queue settings of subscriptions.
    pub queue: QueueDefaults,
    /// The NATS keys.
    pub options: NatsOptions,
}

impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsConfig")
            .field("bus", &self.bus)
            .field("url", &redact_url(&self.url))
            .field("mode", &self.mode)
            .field("app", &self.app)
            .field("queue", &self.queue)
            .field("options", &self.options)
            .finish()
    }
}

impl NatsConfig {
    /// A broadcast bus named `bus` on `url` with default options (app `busway`).
    pub fn new(bus: impl Into<String>, url: impl Into<String>) -> NatsConfig {
        NatsConfig {
            bus: bus.into(),
            url: url.into(),
            mode: Mode::Broadcast,
            app: "busway".to_string(),
            queue: QueueDefaults::default(),
            options: NatsOptions::default(),
        }
    }

    /// Sets the mode.
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Sets the app name (the connection is named `busway:<app>:<bus>`).
    pub fn app(mut self, app: impl Into<String>) -> Self {
        self.app = app.into();
        self
    }

    /// Sets the subscriptions' default queue capacity and overflow policy.
    pub fn queue(mut self, queue: QueueDefaults) -> Self {
        self.queue = queue;
        self
    }

    /// Replaces the NATS keys.
    pub fn options(mut self, options: NatsOptions) -> Self {
        self.options = options;
        self
    }

    /// Sets the framing.
    pub fn framing(mut self, framing: Framing) -> Self {
        self.options.framing = framing;
        self
    }

    /// Sets what `publish` does while disconnected.
    pub fn on_disconnect(mut self, on_disconnect: OnDisconnect) -> Self {
        self.options.on_disconnect = on_disconnect;
        self
    }

    /// Sets the publish timeout.
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.options.publish_timeout = Some(ConfigDuration(timeout));
        self
    }

    /// Sets the connect timeout.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.options.connect_timeout = Some(ConfigDuration(timeout));
        self
    }

    /// Reads a bus's config as the registry hands it over (`url` defaults to
    /// [`DEFAULT_URL`]) and checks it as far as it can without a server.
    ///
    /// # Errors
    /// `InvalidConfig` naming the file and `buses.<bus>.<key>`: a renamed or unknown key, a
    /// bad value, a URL that is not a NATS URL, `user` without `password` (or the reverse),
    /// a malformed `nkey`, an unreadable or malformed `creds` file, an unreadable `tls_*`
    /// file, `tls_cert` without `tls_key` (or the reverse); in stream mode an invalid
    /// `stream` name, `subjects` or `dead_letter` topic.
    pub fn from_context(ctx: &BuildContext<'_>) -> Result<NatsConfig> {
        ctx.check_renamed(RENAMED)?;
        let options: NatsOptions = ctx.options()?;
        let config = NatsConfig {
            bus: ctx.bus.to_string(),
            url: ctx
                .config
                .url
                .clone()
                .unwrap_or_else(|| DEFAULT_URL.to_string()),
            mode: ctx.config.mode,
            app: ctx.app.to_string(),
            queue: ctx.config.queue_defaults(),
            options,
        };
        config
            .check()
            .map_err(|(key, why)| ctx.config_error(key, why))?;
        Ok(config)
    }

    /// The connection's client name: `busway:<app>:<bus>`.
    pub fn client_name(&self) -> String {
        format!("busway:{}:{}", self.app, self.bus)
    }

    /// The URL list with passwords and tokens replaced by `***`.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }

    /// Checks everything that needs no server, and returns what connecting takes from it;
    /// `(key, reason)` of the first problem.
    pub(crate) fn check(&self) -> std::result::Result<Checked, (&'static str, String)> {
        let servers = Servers::parse(&self.url).map_err(|why| ("url", why))?;
        let o = &self.options;
        match (&o.user, &o.password) {
            (Some(_), None) => return Err(("password", "`user` is set without `password`".into())),
            (None, Some(_)) => return Err(("user", "`password` is set without `user`".into())),
            _ => {}
        }
        if let Some(seed) = &o.nkey {
            // The seed itself is never part of the message.
            if nkeys::KeyPair::from_seed(seed).is_err() {
                return Err(("nkey", "is not an NKey seed (`SU...`)".into()));
            }
        }
        if let Some(path) = &o.creds {
            let text = std::fs::read_to_string(path)
                .map_err(|e| ("creds", format!("cannot read the credentials file: {e}")))?;
            async_nats::ConnectOptions::with_credentials(&text).map_err(|e| {
                (
                    "creds",
                    format!("is not a credentials file (a user JWT and its NKey seed): {e}"),
                )
            })?;
        }
        if o.tls_cert.is_some() != o.tls_key.is_some() {
            return Err((
                "tls_cert",
                "`tls_cert` and `tls_key` must be set together".into(),
            ));
        }
        for (key, path) in [
            ("tls_ca", &o.tls_ca),
            ("tls_cert", &o.tls_cert),
            ("tls_key", &o.tls_key),
        ] {
            if let Some(path) = path {
                readable(path).map_err(|why| (key, why))?;
            }
        }
        let stream = match self.mode {
            Mode::Broadcast => None,
            Mode::Stream => Some(StreamKeys::check(&self.bus, o)?),
        };
        Ok(Checked { servers, stream })
    }
}

fn readable(path: &Path) -> std::result::Result<(), String> {
    std::fs::File::open(path)
        .map(drop)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// What a valid [`NatsConfig`] gives connecting.
#[derive(Debug)]
pub(crate) struct Checked {
    pub(crate) servers: Servers,
    /// Stream mode only.
    pub(crate) stream: Option<StreamKeys>,
}

/// The seed servers of a URL list: addresses without their credentials, and the
/// credentials the URLs carry (async-nats ignores credentials in URLs).
#[derive(Debug)]
pub(crate) struct Servers {
    /// The addresses, userinfo removed: async-nats logs addresses at debug level.
    pub(crate) addrs: Vec<ServerAddr>,
    /// `nats://user:pass@host` (the last URL that has them).
    pub(crate) user_pass: Option<(String, String)>,
    /// `nats://token@host` (the last URL that has one).
    pub(crate) token: Option<String>,
}

impl Servers {
    /// Parses a comma-separated URL list; the reason names the offending URL, redacted.
    fn parse(url: &str) -> std::result::Result<Servers, String> {
        let mut servers = Servers {
            addrs: Vec::new(),
            user_pass: None,
            token: None,
        };
        for one in url.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let not_nats =
                |e: std::io::Error| format!("{:?} is not a NATS URL: {e}", redact_url(one));
            // Parsed as written first, so a bad userinfo is refused too.
            let addr = ServerAddr::from_str(one).map_err(not_nats)?;
            let addr = match split_userinfo(one) {
                Some((scheme, Some(userinfo), rest)) => {
                    match userinfo.split_once(':') {
                        Some((u, p)) => {
                            servers.user_pass = Some((decode_userinfo(u), decode_userinfo(p)));
                        }
                        None => servers.token = Some(decode_userinfo(userinfo)),
                    }
                    ServerAddr::from_str(&format!("{scheme}{rest}")).map_err(not_nats)?
                }
                _ => addr,
            };
            servers.addrs.push(addr);
        }
        if servers.addrs.is_empty() {
            return Err("is empty".into());
        }
        Ok(servers)
    }
}

/// Percent-decodes URL user info (`p%40ss` -> `p@ss`).
fn decode_userinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The stream-mode keys, checked.
#[derive(Debug)]
pub(crate) struct StreamKeys {
    /// The JetStream stream's name.
    pub(crate) name: String,
    /// The subjects to create the stream with.
    pub(crate) subjects: Vec<String>,
    /// No `subjects` in config: the stream's subjects grow with use.
    pub(crate) auto: bool,
    pub(crate) dead_letter: Option<Topic>,
    /// The durable consumer name template of groups (`{group}`, `{hash}`, `{bus}`).
    pub(crate) durable: String,
}

impl StreamKeys {
    fn check(
        bus: &str,
        o: &NatsOptions,
    ) -> std::result::Result<StreamKeys, (&'static str, String)> {
        let name = o
            .stream
            .clone()
            .unwrap_or_else(|| format!("BUSWAY_{}", bus.to_uppercase().replace('-', "_")));
        if name.is_empty()
            || name
                .bytes()
                .any(|b| !(0x21..=0x7e).contains(&b) || b".*>/\\".contains(&b))
        {
            return Err((
                "stream",
                format!("{name:?} is not a valid JetStream stream name (no '.', '*', '>', '/', '\\' or spaces)"),
            ));
        }
        if let Some(r) = o.replicas {
            if !(1..=5).contains(&r) {
                return Err((
                    "replicas",
                    format!("is {r}; JetStream keeps 1 to 5 replicas"),
                ));
            }
        }
        if o.duplicate_window.is_some_and(|d| d.0.is_zero()) {
            return Err(("duplicate_window", "must be longer than 0".into()));
        }
        let auto = o.subjects.is_none();
        let subjects = o
            .subjects
            .clone()
            .unwrap_or_else(|| vec![format!("{bus}.>")]);
        if subjects.is_empty() {
            return Err(("subjects", "is empty".into()));
        }
        for s in &subjects {
            Pattern::new(s).map_err(|e| ("subjects", e.to_string()))?;
        }
        if o.max_deliveries.is_some_and(|n| n > 0) && o.dead_letter.is_none() {
            return Err((
                "max_deliveries",
                "is set without `dead_letter`: set `dead_letter` too, so messages given up are kept, or leave `max_deliveries` out (redeliver until acked)".into(),
            ));
        }
        let dead_letter = match &o.dead_letter {
            Some(t) => Some(Topic::new(t).map_err(|e| ("dead_letter", e.to_string()))?),
            None => None,
        };
        let durable = o.durable.clone().unwrap_or_else(|| "{group}-{hash}".into());
        check_durable(&durable).map_err(|why| ("durable", why))?;
        Ok(StreamKeys {
            name,
            subjects,
            auto,
            dead_letter,
            durable,
        })
    }
}

/// Why a durable name template cannot name JetStream consumers.
fn check_durable(t: &str) -> std::result::Result<(), String> {
    if !t.contains("{group}") {
        return Err(format!(
            "{t:?} has no {{group}}: two groups would share one durable consumer"
        ));
    }
    let literal = t
        .replace("{group}", "")
        .replace("{hash}", "")
        .replace("{bus}", "");
    if let Some(c) = literal
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(format!(
            "{t:?}: {c:?} is neither a placeholder ({{group}}, {{hash}}, {{bus}}) nor a letter, digit, '-' or '_'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> std::result::Result<NatsOptions, toml::de::Error> {
        toml::from_str(text)
    }

    #[test]
    fn durations_take_units_or_seconds() {
        let c =
            parse("max_age = \"7d\"\npublish_timeout = 2\nconnect_timeout = \"250ms\"").unwrap();
        assert_eq!(
            c.max_age,
            Some(ConfigDuration(Duration::from_secs(7 * 86_400)))
        );
        assert_eq!(c.publish_timeout(), Duration::from_secs(2));
        assert_eq!(c.connect_timeout(), Duration::from_millis(250));
        let err = parse("max_age = \"7 weeks\"").unwrap_err().to_string();
        assert!(err.contains("invalid duration \"7 weeks\""), "{err}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = parse("tokne = \"x\"").unwrap_err().to_string();
        assert!(err.contains("unknown field `tokne`"), "{err}");
    }

    #[test]
    fn debug_hides_secrets() {
        let c = parse(
            "user = \"alice\"\npassword = \"hunter2\"\ntoken = \"t0ken\"\nnkey = \"SUAKEY\"\ncreds = \"/x/secret.creds\"",
        )
        .unwrap();
        let config = NatsConfig::new("b", "nats://bob:pa55word@h:4222").options(c);
        let dbg = format!("{config:?}");
        for secret in ["hunter2", "t0ken", "SUAKEY", "secret.creds", "pa55word"] {
            assert!(!dbg.contains(secret), "{secret} in {dbg}");
        }
        assert!(dbg.contains("alice"), "{dbg}");
    }

    #[test]
    fn client_capacity_follows_the_queue() {
        let c = NatsOptions::default();
        assert_eq!(c.client_capacity(16), 65_536);
        assert_eq!(c.client_capacity(200_000), 200_000);
        assert_eq!(c.client_capacity(1 << 20), 1 << 20);
        let c = parse("client_capacity = 64").unwrap();
        assert_eq!(c.client_capacity(4096), 64);
    }

    #[test]
    fn url_credentials_leave_the_addresses() {
        let s =
            Servers::parse("nats://al%40ce:p%3Ass@h1:4222, tls://t0k@h2:4223,,ws://h3").unwrap();
        assert_eq!(s.addrs.len(), 3);
        for addr in &s.addrs {
            assert_eq!(addr.username(), None);
        }
        assert_eq!(s.user_pass, Some(("al@ce".to_string(), "p:ss".to_string())));
        assert_eq!(s.token.as_deref(), Some("t0k"));
        assert_eq!(Servers::parse(" , ").unwrap_err(), "is empty");
    }
}
