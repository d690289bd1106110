//! The bus's JetStream stream: created or updated at build, and grown with use when its
//! subjects are not configured.

use std::collections::HashSet;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use busway::{Error, ErrorKind, Pattern, Result, Topic};
use parking_lot::Mutex;

use super::{js_err, StreamSetup};
use crate::config::{NatsOptions, Storage, StreamKeys};

impl StreamSetup {
    /// Creates the stream with the configured settings. An existing stream is used as it is
    /// (a warning names the settings that differ from the config), unless `update_stream`
    /// is set; without `subjects` in config its subjects still grow with use.
    pub(crate) async fn ensure(
        bus: &str,
        options: &NatsOptions,
        keys: StreamKeys,
        client: &async_nats::Client,
    ) -> Result<StreamSetup> {
        let StreamKeys {
            name,
            subjects: mut subject_strings,
            auto,
            dead_letter,
            durable,
        } = keys;
        let js = jetstream::ContextBuilder::new()
            .timeout(options.publish_timeout())
            .backpressure_on_inflight(true)
            .build(client.clone());

        let want_storage = match options.storage {
            Storage::File => stream::StorageType::File,
            Storage::Memory => stream::StorageType::Memory,
        };
        let max_messages = options.max_msgs.unwrap_or(-1);
        let max_bytes = options.max_bytes.unwrap_or(-1);
        let max_age = options.max_age.map(|d| d.0).unwrap_or(Duration::ZERO);
        let what = format!(
            "bus {:?}: JetStream stream {name:?} (subjects {subject_strings:?})",
            bus
        );
        let want_replicas = options.replicas.unwrap_or(1).max(1);
        match js.get_stream(&name).await {
            Ok(mut existing) => {
                let info = existing
                    .info()
                    .await
                    .map_err(|e| js_err(format!("{what}: reading its info"), e))?;
                let have = info.config.clone();
                let mut want = have.clone();
                if auto {
                    // Keep what earlier runs and other processes added.
                    for s in &have.subjects {
                        if !subject_strings.contains(s) {
                            subject_strings.push(s.clone());
                        }
                    }
                }
                want.subjects = subject_strings.clone();
                want.max_messages = max_messages;
                want.max_bytes = max_bytes;
                want.max_age = max_age;
                want.num_replicas = want_replicas;
                if let Some(window) = options.duplicate_window {
                    want.duplicate_window = window.0;
                }
                let differs = differences(&have, &want, want_storage, auto);
                // Growing the subjects (no `subjects` in config) is what the bus does on
                // first use of a token anyway; it is not an edit of the operator's settings.
                let grown = auto && !same_set(&have.subjects, &want.subjects);
                if options.update_stream && !differs.is_empty() {
                    tracing::warn!(
                        bus,
                        stream = %name,
                        differs = %differs.join("; "),
                        "JetStream stream settings differ from the config; updating the stream (update_stream = true)"
                    );
                    js.update_stream(want)
                        .await
                        .map_err(|e| js_err(format!("{what}: updating it"), e))?;
                } else {
                    if !differs.is_empty() {
                        tracing::warn!(
                            bus,
                            stream = %name,
                            differs = %differs.join("; "),
                            "JetStream stream settings differ from the config; using the stream as it is (set update_stream = true to change it)"
                        );
                    }
                    if grown {
                        let mut cfg = have.clone();
                        cfg.subjects = subject_strings.clone();
                        js.update_stream(cfg)
                            .await
                            .map_err(|e| js_err(format!("{what}: adding subjects"), e))?;
                    } else if !auto {
                        // What the stream stores decides which topics the bus accepts.
                        subject_strings = have.subjects.clone();
                    }
                }
            }
            Err(e) if matches!(e.kind(), async_nats::jetstream::context::GetStreamErrorKind::JetStream(ref j) if j.code() == 404) =>
            {
                js.create_stream(stream::Config {
                    name: name.clone(),
                    subjects: subject_strings.clone(),
                    max_messages,
                    max_bytes,
                    max_age,
                    storage: want_storage,
                    num_replicas: want_replicas,
                    // Zero: the server's default window.
                    duplicate_window: options.duplicate_window.map_or(Duration::ZERO, |d| d.0),
                    ..Default::default()
                })
                .await
                .map_err(|e| js_err(format!("{what}: creating it"), e))?;
            }
            Err(e) => return Err(js_err(format!("{what}: looking it up"), e)),
        }
        tracing::debug!(bus, stream = %name, "JetStream stream ready");
        // Subjects the server holds may use NATS syntax busway patterns refuse; those are
        // skipped here (a topic they capture is then treated as outside the stream).
        let subjects = subject_strings
            .iter()
            .filter_map(|s| Pattern::new(s).ok())
            .collect();
        Ok(StreamSetup {
            js,
            name,
            subjects: parking_lot::RwLock::new(subjects),
            auto,
            growing: tokio::sync::Mutex::new(()),
            max_deliveries: options.max_deliveries(),
            dead_letter,
            durable,
            ephemeral: Mutex::new(HashSet::new()),
            lines: Mutex::new(Vec::new()),
            drains: Mutex::new(Vec::new()),
        })
    }

    /// In auto mode, adds `first` and `first.>` to the stream unless already captured.
    async fn grow(&self, bus: &str, first: &str) -> Result<()> {
        let probe = Topic::new(format!("{first}.x"))?;
        let single = Topic::new(first)?;
        if self.captures(&probe) && self.captures(&single) {
            return Ok(());
        }
        let _one_at_a_time = self.growing.lock().await;
        if self.captures(&probe) && self.captures(&single) {
            return Ok(());
        }
        let what = format!(
            "bus {bus:?}: adding {first:?} to JetStream stream {:?}",
            self.name
        );
        let mut stream = self
            .js
            .get_stream(&self.name)
            .await
            .map_err(|e| js_err(what.clone(), e))?;
        let mut cfg = stream
            .info()
            .await
            .map_err(|e| js_err(what.clone(), e))?
            .config
            .clone();
        for s in [first.to_string(), format!("{first}.>")] {
            if !cfg.subjects.contains(&s) {
                cfg.subjects.push(s);
            }
        }
        let subjects = cfg.subjects.clone();
        self.js
            .update_stream(cfg)
            .await
            .map_err(|e| js_err(what, e))?;
        *self.subjects.write() = subjects
            .iter()
            .filter_map(|s| Pattern::new(s).ok())
            .collect();
        Ok(())
    }

    /// Makes sure the stream stores `topic` (growing it in auto mode).
    pub(crate) async fn ensure_topic(&self, bus: &str, topic: &Topic) -> Result<()> {
        if self.captures(topic) {
            return Ok(());
        }
        if !self.auto {
            return Err(self.not_captured(bus, topic));
        }
        let first = topic.tokens().next().unwrap_or_default();
        self.grow(bus, first).await
    }

    /// Makes sure the stream can hold what `pattern` matches (growing it in auto mode).
    pub(super) async fn ensure_pattern(&self, bus: &str, pattern: &Pattern) -> Result<()> {
        use busway::topic::PatternToken;
        if self.subjects.read().iter().any(|s| s.covers(pattern)) {
            return Ok(());
        }
        match (self.auto, pattern.tokens().first()) {
            (true, Some(PatternToken::Literal(first))) => self.grow(bus, first).await,
            _ if self.subjects.read().iter().any(|s| s.overlaps(pattern)) => Ok(()),
            _ => Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "bus {bus:?}: pattern {:?} matches nothing JetStream stream {:?} stores (subjects {:?}){}",
                    pattern.as_str(),
                    self.name,
                    self.subject_list(),
                    if self.auto { "; a pattern starting with a wildcard needs `subjects` in config" } else { "" }
                ),
            )),
        }
    }

    fn not_captured(&self, bus: &str, topic: &Topic) -> Error {
        Error::new(
            ErrorKind::Unsupported,
            format!(
                "bus {bus:?}: topic {:?} is outside JetStream stream {:?} (subjects {:?}); add it to `subjects`",
                topic.as_str(),
                self.name,
                self.subject_list()
            ),
        )
    }
}

/// The settings of stream `have` that differ from `want` (and from the configured
/// storage, which an update cannot change), as `key: stream <value>, config <value>`.
fn differences(
    have: &stream::Config,
    want: &stream::Config,
    want_storage: stream::StorageType,
    auto: bool,
) -> Vec<String> {
    fn limit(v: i64) -> String {
        if v < 0 {
            "none".into()
        } else {
            v.to_string()
        }
    }
    fn age(d: Duration) -> String {
        if d.is_zero() {
            "none".into()
        } else {
            format!("{d:?}")
        }
    }
    let mut out = Vec::new();
    let mut differ = |key: &str, h: String, w: String| {
        if h != w {
            out.push(format!("{key}: stream {h}, config {w}"));
        }
    };
    // Without `subjects` in config the subjects follow use: not a difference.
    if !auto && !same_set(&have.subjects, &want.subjects) {
        differ(
            "subjects",
            format!("{:?}", have.subjects),
            format!("{:?}", want.subjects),
        );
    }
    differ(
        "replicas",
        have.num_replicas.max(1).to_string(),
        want.num_replicas.to_string(),
    );
    differ(
        "storage",
        format!("{:?}", have.storage),
        format!("{want_storage:?}"),
    );
    differ(
        "max_msgs",
        limit(have.max_messages),
        limit(want.max_messages),
    );
    differ("max_bytes", limit(have.max_bytes), limit(want.max_bytes));
    differ("max_age", age(have.max_age), age(want.max_age));
    differ(
        "duplicate_window",
        format!("{:?}", have.duplicate_window),
        format!("{:?}", want.duplicate_window),
    );
    out
}

fn same_set(a: &[String], b: &[String]) -> bool {
    let mut a = a.to_vec();
    let mut b = b.to_vec();
    a.sort();
    b.sort();
    a == b
}
