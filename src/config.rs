//! The config file (TOML) and its environment overrides.
//!
//! ```toml
//! [app]
//! name = "portfolio"            # client names become busway:<app>:<bus>
//!
//! [buses.marketdata]
//! transport = "nats"            # memory | redis | nats (whatever is registered)
//! url = "nats://127.0.0.1:4222"
//! overflow = "latest"           # default overflow policy of this bus's subscriptions
//! capacity = 4096               # default queue capacity
//!
//! [buses.engine]
//! transport = "redis"
//! url = "redis://127.0.0.1:6381"
//! mode = "stream"               # broadcast (default) | stream
//!
//! [buses.main]
//! transport = "redis"
//! url = "redis://127.0.0.1:6379"
//!
//! [[routes]]
//! match = "marketdata.>"
//! to = "marketdata"             # or a list: a mirror
//!
//! [[routes]]
//! match = "engine.>"
//! to = "engine"
//!
//! [default]
//! to = "main"
//!
//! [router]
//! dedup_window = 10000          # ids remembered by subscriptions on several buses (mirrors)
//! drain_grace = "500ms"         # a reload's wait for in-flight messages on retired buses
//! ```
//!
//! Keys not listed in [`BusConfig`] belong to the bus's transport, which reads them with
//! [`BuildContext::options`](crate::transport::BuildContext::options) and rejects the ones it does not
//! know.
//!
//! Environment overrides (applied by [`Config::apply_env`]):
//! - `BUSWAY_TRANSPORT=memory`: every bus uses that transport (transport-specific keys of the
//!   old transport are dropped), so a whole platform runs with no broker.
//! - `BUSWAY_BUS_<NAME>_TRANSPORT`, `BUSWAY_BUS_<NAME>_URL`, `BUSWAY_BUS_<NAME>_MODE`: one bus
//!   (`<NAME>` upper-cased, `-` as `_`).
//! - `BUSWAY_APP_NAME`: the app name.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::bus::Mode;
use crate::error::{Error, Result};
use crate::options::Overflow;
pub use crate::options::{QueueDefaults, DEFAULT_ACK_TIMEOUT, DEFAULT_CAPACITY};
use crate::topic::Pattern;
use crate::url::{is_secret_key, redact_url};

/// A whole config: app, buses, routes, default bus.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where the config came from (a path, or `<inline>`), for error messages.
    pub source: String,
    /// The app (process) name.
    pub app: String,
    /// Buses by name.
    pub buses: BTreeMap<String, BusConfig>,
    /// The routing table, in order: the first match wins.
    pub routes: Vec<RouteConfig>,
    /// Buses that carry topics no route matches.
    pub default: Option<Vec<String>>,
    /// The `[router]` section.
    pub router: RouterSettings,
}

/// The `[router]` section: the router's own knobs (unset keys take the defaults).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterSettings {
    /// Message ids a subscription listening on several buses remembers to drop duplicate
    /// copies ([`DEFAULT_DEDUP_WINDOW`](crate::router::DEFAULT_DEDUP_WINDOW) when unset; 0 = off).
    pub dedup_window: Option<usize>,
    /// How long a reload waits for in-flight messages before ending subscriptions on buses
    /// the new table does not use
    /// ([`DEFAULT_DRAIN_GRACE`](crate::router::DEFAULT_DRAIN_GRACE) when unset).
    pub drain_grace: Option<ConfigDuration>,
}

/// One bus: its transport kind, mode, queue defaults and transport-specific keys.
#[derive(Clone, PartialEq, Deserialize)]
pub struct BusConfig {
    /// The transport kind (`memory`, `redis`, `nats`).
    pub transport: String,
    /// `broadcast` (default) or `stream`.
    #[serde(default)]
    pub mode: Mode,
    /// The broker URL, for broker transports. Never printed with its password.
    #[serde(default)]
    pub url: Option<String>,
    /// Default queue capacity of subscriptions on this bus (1024 when unset).
    #[serde(default)]
    pub capacity: Option<usize>,
    /// Default overflow policy of subscriptions on this bus (`block` when unset).
    #[serde(default)]
    pub overflow: Option<Overflow>,
    /// Every other key, for the transport to read.
    #[serde(flatten)]
    pub options: toml::Table,
}

impl BusConfig {
    /// A bus of `transport` kind with everything else default.
    pub fn new(transport: impl Into<String>) -> Self {
        BusConfig {
            transport: transport.into(),
            mode: Mode::Broadcast,
            url: None,
            capacity: None,
            overflow: None,
            options: toml::Table::new(),
        }
    }

    /// The queue defaults of subscriptions on this bus.
    pub fn queue_defaults(&self) -> QueueDefaults {
        QueueDefaults {
            capacity: self.capacity.unwrap_or(DEFAULT_CAPACITY).max(1),
            overflow: self.overflow.unwrap_or_default(),
        }
    }
}

impl fmt::Debug for BusConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let options: BTreeMap<&str, String> = self
            .options
            .iter()
            .map(|(k, v)| {
                let secret = is_secret_key(k);
                (
                    k.as_str(),
                    if secret {
                        "***".to_string()
                    } else {
                        v.to_string()
                    },
                )
            })
            .collect();
        f.debug_struct("BusConfig")
            .field("transport", &self.transport)
            .field("mode", &self.mode)
            .field("url", &self.url.as_deref().map(redact_url))
            .field("capacity", &self.capacity)
            .field("overflow", &self.overflow)
            .field("options", &options)
            .finish()
    }
}

/// How a broker transport puts a message on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Framing {
    /// busway's format: the headers travel with the payload (Redis: a compact versioned
    /// frame; NATS: NATS headers). See the transport's README for the layout.
    #[default]
    Busway,
    /// The payload alone, so non-busway clients interoperate; no headers travel
    /// (`Capabilities::headers` is false).
    Raw,
}

/// What `publish` does while a broker transport cannot reach its server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDisconnect {
    /// Hold publishes (up to the bus's `publish_buffer`) and send them after reconnecting;
    /// past the bound, `publish` fails with `ErrorKind::BufferFull`.
    #[default]
    Buffer,
    /// Fail at once with `ErrorKind::Connection` naming the bus.
    Fail,
}

/// A duration in config: a string with a unit (`"500ms"`, `"5s"`, `"2m"`, `"1h"`, `"7d"`)
/// or a whole number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigDuration(pub std::time::Duration);

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(s) => Ok(ConfigDuration(std::time::Duration::from_secs(s))),
            Raw::Text(t) => parse_duration(&t).map(ConfigDuration).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "invalid duration {t:?}; expected a number with a unit: ms, s, m, h or d (e.g. \"30s\")"
                ))
            }),
        }
    }
}

fn parse_duration(text: &str) -> Option<std::time::Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = text.split_at(split);
    let n: u64 = n.parse().ok()?;
    let ms = match unit.trim() {
        "ms" => n,
        "s" => n.checked_mul(1000)?,
        "m" => n.checked_mul(60_000)?,
        "h" => n.checked_mul(3_600_000)?,
        "d" => n.checked_mul(86_400_000)?,
        _ => return None,
    };
    Some(std::time::Duration::from_millis(ms))
}

/// One rule of the routing table.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    /// Topics this rule takes.
    pub pattern: Pattern,
    /// The bus, or several buses (a mirror: every publish goes to all of them).
    pub to: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    app: RawApp,
    #[serde(default)]
    buses: BTreeMap<String, toml::Value>,
    #[serde(default)]
    routes: Vec<toml::Value>,
    #[serde(default)]
    default: Option<toml::Value>,
    #[serde(default)]
    router: Option<toml::Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawApp {
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    #[serde(rename = "match")]
    pattern: String,
    to: OneOrMany,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefault {
    to: OneOrMany,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// The reason a toml/serde error gives, without its source excerpt.
fn reason(e: &toml::de::Error) -> String {
    e.message().trim().to_string()
}

fn bad(source: &str, key: &str, why: impl fmt::Display) -> Error {
    Error::config(format!("{source}: {key}: {why}"))
}

/// Deserializes the value at `key` as `T`; an error names the key down to the offending
/// field (`buses.a.capacity`), which serde alone would not.
fn typed<T: DeserializeOwned>(value: toml::Value, source: &str, key: &str) -> Result<T> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let key = if path.is_empty() || path == "." {
            key.to_string()
        } else {
            format!("{key}.{path}")
        };
        bad(source, &key, reason(e.inner()))
    })
}

impl Config {
    /// Reads and validates a config file (without environment overrides).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidConfig`](crate::ErrorKind::InvalidConfig) naming the file, the key
    /// and the reason.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Config> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::config(format!("{}: cannot read the config file", path.display())).with_source(e)
        })?;
        Config::from_toml(&text, &path.display().to_string())
    }

    /// Reads a config file and applies the process's `BUSWAY_*` environment variables.
    ///
    /// # Errors
    /// As [`Config::from_file`] and [`Config::apply_env`].
    pub fn load(path: impl AsRef<Path>) -> Result<Config> {
        let mut config = Config::from_file(path)?;
        config.apply_env(std::env::vars())?;
        Ok(config)
    }

    /// Parses and validates config text; `source` names it in errors.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidConfig`](crate::ErrorKind::InvalidConfig) naming `source`, the key
    /// and the reason: TOML syntax, unknown keys, wrong types, invalid patterns, routes or
    /// default naming buses that do not exist.
    pub fn from_toml(text: &str, source: &str) -> Result<Config> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let at = e
                .span()
                .map(|s| {
                    let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
                    format!(" (line {line})")
                })
                .unwrap_or_default();
            Error::config(format!("{source}{at}: {}", reason(&e)))
        })?;
        let app = raw.app.name.unwrap_or_else(|| "busway".to_string());
        if app.is_empty()
            || !app
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(bad(
                source,
                "app.name",
                format!("{app:?} must be non-empty ASCII letters, digits, '-' or '_'"),
            ));
        }
        let mut buses = BTreeMap::new();
        for (name, value) in raw.buses {
            let key = format!("buses.{name}");
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(bad(
                    source,
                    &key,
                    "a bus name must be ASCII letters, digits, '-' or '_'",
                ));
            }
            let bus = typed::<BusConfig>(value, source, &key)?;
            if bus.transport.is_empty() {
                return Err(bad(source, &format!("{key}.transport"), "is empty"));
            }
            if bus.capacity == Some(0) {
                return Err(bad(
                    source,
                    &format!("{key}.capacity"),
                    "must be at least 1 (a subscription's queue holds at least one message)",
                ));
            }
            buses.insert(name, bus);
        }
        let router = match raw.router {
            Some(value) if value.get("drain_grace_ms").is_some() => {
                return Err(bad(
                    source,
                    "router.drain_grace_ms",
                    "renamed to `drain_grace`, a duration with a unit (e.g. \"500ms\")",
                ))
            }
            Some(value) => typed::<RouterSettings>(value, source, "router")?,
            None => RouterSettings::default(),
        };
        let mut config = Config {
            source: source.to_string(),
            app,
            buses,
            routes: Vec::new(),
            default: None,
            router,
        };
        for (i, value) in raw.routes.into_iter().enumerate() {
            let key = format!("routes[{i}]");
            let r = typed::<RawRoute>(value, source, &key)?;
            let pattern =
                Pattern::new(&r.pattern).map_err(|e| bad(source, &format!("{key}.match"), e))?;
            config.routes.push(RouteConfig {
                pattern,
                to: r.to.into_vec(),
            });
        }
        if let Some(value) = raw.default {
            let d = typed::<RawDefault>(value, source, "default")?;
            config.default = Some(d.to.into_vec());
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks that every route and the default name existing buses, at least one each.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidConfig`](crate::ErrorKind::InvalidConfig) naming the key.
    pub fn validate(&self) -> Result<()> {
        let known = || self.buses.keys().cloned().collect::<Vec<_>>().join(", ");
        let check = |key: &str, to: &[String]| -> Result<()> {
            if to.is_empty() {
                return Err(bad(&self.source, key, "names no bus"));
            }
            for name in to {
                if !self.buses.contains_key(name) {
                    return Err(bad(
                        &self.source,
                        key,
                        format!("unknown bus {name:?}; the buses are: {}", known()),
                    ));
                }
            }
            Ok(())
        };
        for (i, r) in self.routes.iter().enumerate() {
            check(&format!("routes[{i}].to"), &r.to)?;
        }
        if let Some(d) = &self.default {
            check("default.to", d)?;
        }
        Ok(())
    }

    /// Applies `BUSWAY_*` overrides from `vars` (usually `std::env::vars()`).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidConfig`](crate::ErrorKind::InvalidConfig) naming the variable when
    /// it names an unknown bus or holds a bad value.
    pub fn apply_env(&mut self, vars: impl IntoIterator<Item = (String, String)>) -> Result<()> {
        let vars: Vec<(String, String)> = vars
            .into_iter()
            .filter(|(k, _)| k.starts_with("BUSWAY_"))
            .collect();
        let env_err =
            |var: &str, why: String| Error::config(format!("environment variable {var}: {why}"));
        // The global switch first, so per-bus variables can refine it.
        if let Some((_, kind)) = vars.iter().find(|(k, _)| k == "BUSWAY_TRANSPORT") {
            for bus in self.buses.values_mut() {
                set_transport(bus, kind);
            }
        }
        for (var, value) in &vars {
            if var == "BUSWAY_APP_NAME" {
                self.app = value.clone();
                continue;
            }
            let Some(rest) = var.strip_prefix("BUSWAY_BUS_") else {
                continue;
            };
            let (field, bus_key) = ["_TRANSPORT", "_URL", "_MODE"]
                .iter()
                .find_map(|f| rest.strip_suffix(f).map(|b| (*f, b)))
                .ok_or_else(|| {
                    env_err(
                        var,
                        "expected BUSWAY_BUS_<NAME>_TRANSPORT, _URL or _MODE".into(),
                    )
                })?;
            let name = self
                .buses
                .keys()
                .find(|n| n.to_uppercase().replace('-', "_") == bus_key)
                .cloned()
                .ok_or_else(|| {
                    env_err(
                        var,
                        format!(
                            "no bus is named {bus_key:?} in {}; the buses are: {}",
                            self.source,
                            self.buses.keys().cloned().collect::<Vec<_>>().join(", ")
                        ),
                    )
                })?;
            let bus = self.buses.get_mut(&name).expect("bus name found above");
            match field {
                "_TRANSPORT" => set_transport(bus, value),
                "_URL" => bus.url = Some(value.clone()),
                _ => {
                    bus.mode = match value.as_str() {
                        "broadcast" => Mode::Broadcast,
                        "stream" => Mode::Stream,
                        other => {
                            return Err(env_err(
                                var,
                                format!("unknown mode {other:?}; expected broadcast or stream"),
                            ))
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Sets every bus's transport to `kind` (e.g. `memory` for tests).
    pub fn set_all_transports(&mut self, kind: &str) {
        for bus in self.buses.values_mut() {
            set_transport(bus, kind);
        }
    }
}

/// Switches a bus's transport; keys that belonged to the old transport are dropped.
fn set_transport(bus: &mut BusConfig, kind: &str) {
    if bus.transport != kind {
        bus.transport = kind.to_string();
        bus.options.clear();
    }
}

/// Deserializes transport-specific keys, naming `source` and `key_prefix` in errors.
pub(crate) fn options_from_table<T: DeserializeOwned>(
    table: &toml::Table,
    source: &str,
    key_prefix: &str,
) -> Result<T> {
    typed(toml::Value::Table(table.clone()), source, key_prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[app]
name = "portfolio"

[buses.marketdata]
transport = "memory"
overflow = "latest"

[buses.engine]
transport = "redis"
url = "redis://user:hunter2@127.0.0.1:6381"
mode = "stream"
stream_maxlen = 1000

[buses.main]
transport = "memory"

[[routes]]
match = "marketdata.>"
to = "marketdata"

[[routes]]
match = "engine.>"
to = ["engine", "main"]

[default]
to = "main"
"#;

    #[test]
    fn parses_the_design_shape() {
        let c = Config::from_toml(GOOD, "busway.toml").unwrap();
        assert_eq!(c.app, "portfolio");
        assert_eq!(c.buses.len(), 3);
        assert_eq!(c.buses["engine"].mode, Mode::Stream);
        assert_eq!(
            c.buses["engine"].options["stream_maxlen"].as_integer(),
            Some(1000)
        );
        assert_eq!(c.buses["marketdata"].overflow, Some(Overflow::Latest));
        assert_eq!(c.routes[1].to, vec!["engine", "main"]);
        assert_eq!(c.default, Some(vec!["main".to_string()]));
    }

    #[test]
    fn debug_never_prints_the_password() {
        let c = Config::from_toml(GOOD, "busway.toml").unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
        assert!(dbg.contains("user:***@127.0.0.1:6381"), "{dbg}");
        assert_eq!(
            redact_url("nats://tok@h:1,nats://a:b@h:2"),
            "nats://***@h:1,nats://a:***@h:2"
        );
        assert_eq!(redact_url("redis://127.0.0.1"), "redis://127.0.0.1");
    }

    #[test]
    fn router_settings_take_durations_and_name_a_renamed_key() {
        let c = Config::from_toml(
            "[router]\ndrain_grace = \"250ms\"\n[buses.a]\ntransport = \"memory\"\n",
            "cfg.toml",
        )
        .unwrap();
        assert_eq!(
            c.router.drain_grace,
            Some(ConfigDuration(std::time::Duration::from_millis(250)))
        );
        let e = Config::from_toml(
            "[router]\ndrain_grace_ms = 250\n[buses.a]\ntransport = \"memory\"\n",
            "cfg.toml",
        )
        .unwrap_err();
        assert_eq!(
            e.message(),
            "cfg.toml: router.drain_grace_ms: renamed to `drain_grace`, a duration with a unit (e.g. \"500ms\")"
        );
    }

    #[test]
    fn errors_name_file_key_and_reason() {
        let cases: &[(&str, &str)] = &[
            (
                "[buses.a]\ntransport = \"memory\"\nmode = \"strem\"\n",
                "cfg.toml: buses.a.mode: unknown variant `strem`",
            ),
            (
                "[buses.a]\nmode = \"stream\"\n",
                "cfg.toml: buses.a: missing field `transport`",
            ),
            (
                "[buses.a]\ntransport = \"memory\"\ncapacity = \"big\"\n",
                "cfg.toml: buses.a.capacity: invalid type",
            ),
            (
                "[buses.a]\ntransport = \"memory\"\n[[routes]]\nmatch = \"x.>\"\nto = \"b\"\n",
                "cfg.toml: routes[0].to: unknown bus \"b\"; the buses are: a",
            ),
            (
                "[buses.a]\ntransport = \"memory\"\n[[routes]]\nmatch = \"x.>.y\"\nto = \"a\"\n",
                "cfg.toml: routes[0].match: invalid pattern \"x.>.y\"",
            ),
            (
                "[buses.a]\ntransport = \"memory\"\n[[routes]]\npattern = \"x\"\nto = \"a\"\n",
                "cfg.toml: routes[0].pattern: unknown field `pattern`",
            ),
            (
                "[default]\nto = \"nope\"\n",
                "cfg.toml: default.to: unknown bus \"nope\"",
            ),
            (
                "[app]\nnam = \"x\"\n",
                "cfg.toml (line 2): unknown field `nam`",
            ),
            ("[buses\n", "cfg.toml (line 1)"),
            ("routes = 3\n", "cfg.toml (line 1): invalid type"),
        ];
        for (text, want) in cases {
            let err = Config::from_toml(text, "cfg.toml").unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::InvalidConfig);
            assert!(
                err.to_string().starts_with(want),
                "want {want:?}, got {err}"
            );
        }
    }

    #[test]
    fn env_overrides_switch_buses() {
        let mut c = Config::from_toml(GOOD, "busway.toml").unwrap();
        c.apply_env([
            ("BUSWAY_TRANSPORT".to_string(), "memory".to_string()),
            ("BUSWAY_BUS_MAIN_URL".to_string(), "redis://h:1".to_string()),
            ("PATH".to_string(), "/bin".to_string()),
        ])
        .unwrap();
        assert!(c.buses.values().all(|b| b.transport == "memory"));
        assert!(
            c.buses["engine"].options.is_empty(),
            "redis-only keys dropped"
        );
        assert_eq!(c.buses["main"].url.as_deref(), Some("redis://h:1"));
        c.apply_env([(
            "BUSWAY_BUS_ENGINE_MODE".to_string(),
            "broadcast".to_string(),
        )])
        .unwrap();
        assert_eq!(c.buses["engine"].mode, Mode::Broadcast);
        let err = c
            .apply_env([("BUSWAY_BUS_NOPE_URL".to_string(), "x".to_string())])
            .unwrap_err();
        assert!(err.to_string().contains("BUSWAY_BUS_NOPE_URL"), "{err}");
        assert!(
            err.to_string().contains("engine, main, marketdata"),
            "{err}"
        );
    }
}
