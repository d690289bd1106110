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
    /// Creates the stream, or brings an existing one to the configured subjects and limits.
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
        match js.get_stream(&name).await {
            Ok(mut existing) => {
                let info = existing
                    .info()
                    .await
                    .map_err(|e| js_err(format!("{what}: reading its info"), e))?;
                let mut cfg = info.config.clone();
                if auto {
                    // Keep what earlier runs and other processes added.
                    for have in &cfg.subjects {
                        if !subject_strings.contains(have) {
                            subject_strings.push(have.clone());
                        }
                    }
                }
                let same = {
                    let mut have = cfg.subjects.clone();
                    let mut want = subject_strings.clone();
                    have.sort();
                    want.sort();
                    have == want
                } && cfg.max_messages == max_messages
                    && cfg.max_bytes == max_bytes
                    && cfg.max_age == max_age;
                if !same {
                    cfg.subjects = subject_strings.clone();
                    cfg.max_messages = max_messages;
                    cfg.max_bytes = max_bytes;
                    cfg.max_age = max_age;
                    js.update_stream(cfg)
                        .await
                        .map_err(|e| js_err(format!("{what}: updating it"), e))?;
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
                    num_replicas: options.replicas.unwrap_or(1).max(1),
                    ..Default::default()
                })
                .await
                .map_err(|e| js_err(format!("{what}: creating it"), e))?;
            }
            Err(e) => return Err(js_err(format!("{what}: looking it up"), e)),
        }
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
            ephemeral: Mutex::new(HashSet::new()),
            lines: Mutex::new(Vec::new()),
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
