//! The NATS-specific keys of a bus's config (`[buses.<name>]` beside `transport = "nats"`).
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
//! subjects = ["engine.>"]      # default: ["<bus>.>"]
//! max_age = "7d"
//! max_deliver = 5
//! dead_letter = "dead.engine"
//! ```

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use busway::transport::{ConfigDuration, Framing, OnDisconnect};
use serde::Deserialize;

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
pub struct NatsConfig {
    /// `busway` (default: busway headers as NATS headers) or `raw` (the payload alone).
    #[serde(default)]
    pub framing: Framing,
    /// `buffer` (default) or `fail`.
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
    /// async-nats's command buffer (publishes waiting to be written, also while
    /// disconnected). Default 8,192.
    #[serde(default)]
    pub publish_buffer: Option<usize>,
    /// Give up reconnecting after this many attempts (default: never give up).
    #[serde(default)]
    pub max_reconnects: Option<usize>,

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
    /// Stream mode: the subjects the stream captures. Default `["<bus>.>"]`.
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
    /// Stream mode: replicas of the stream (cluster). Default 1.
    #[serde(default)]
    pub replicas: Option<usize>,
    /// Stream mode: delivery attempts before a message goes to `dead_letter` (or is
    /// terminated and counted as dropped when no dead-letter topic is set). Default 5;
    /// 0 means retry forever.
    #[serde(default)]
    pub max_deliver: Option<u32>,
    /// Stream mode: where messages go after `max_deliver` failed attempts.
    #[serde(default)]
    pub dead_letter: Option<String>,
}

impl NatsConfig {
    /// The publish timeout (default 5 s).
    pub fn publish_timeout(&self) -> Duration {
        self.publish_timeout
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(5))
    }

    /// The connect timeout (default 5 s).
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(5))
    }

    /// The async-nats subscription channel size for a bus whose queue capacity is
    /// `queue_capacity`: `client_capacity` if set, else the queue capacity but at least
    /// 65,536. Never above what a tokio channel accepts.
    pub fn client_capacity(&self, queue_capacity: usize) -> usize {
        self.client_capacity
            .unwrap_or_else(|| queue_capacity.max(65_536))
            .clamp(1, MAX_CLIENT_CAPACITY)
    }

    /// The delivery attempts before dead-lettering (default 5; 0 = unlimited).
    pub fn max_deliver(&self) -> u32 {
        self.max_deliver.unwrap_or(5)
    }
}

/// tokio's bounded channels refuse more than `usize::MAX >> 3` permits; stay far below.
const MAX_CLIENT_CAPACITY: usize = usize::MAX >> 4;

fn secret(v: &Option<impl Sized>) -> Option<&'static str> {
    v.as_ref().map(|_| "***")
}

impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsConfig")
            .field("framing", &self.framing)
            .field("on_disconnect", &self.on_disconnect)
            .field("publish_timeout", &self.publish_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("client_capacity", &self.client_capacity)
            .field("publish_buffer", &self.publish_buffer)
            .field("max_reconnects", &self.max_reconnects)
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
            .field("max_deliver", &self.max_deliver)
            .field("dead_letter", &self.dead_letter)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<NatsConfig, toml::de::Error> {
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
        let dbg = format!("{c:?}");
        for secret in ["hunter2", "t0ken", "SUAKEY", "secret.creds"] {
            assert!(!dbg.contains(secret), "{secret} in {dbg}");
        }
        assert!(dbg.contains("alice"), "{dbg}");
    }

    #[test]
    fn client_capacity_follows_the_queue() {
        let c = NatsConfig::default();
        assert_eq!(c.client_capacity(16), 65_536);
        assert_eq!(c.client_capacity(200_000), 200_000);
        assert_eq!(c.client_capacity(1 << 20), 1 << 20);
        let c = parse("client_capacity = 64").unwrap();
        assert_eq!(c.client_capacity(4096), 64);
    }
}
