//! [`Ctx`]: what a reader's deliveries need after they leave the reader (to ack, nack,
//! redeliver and dead-letter).

use std::sync::Arc;

use redis::Value;

use busway::transport::{Counters, QueueSender};
use busway::{Bus, Message, Result, Topic};

use super::entry::decode_entry;
use super::registry::StreamState;
use crate::state::Shared;

/// What a reader's deliveries need after they leave the reader.
pub(super) struct Ctx {
    pub(super) shared: Arc<Shared>,
    pub(super) streams: Arc<StreamState>,
    /// The bus deliveries reply through (it does not keep the bus open).
    pub(super) via: Arc<dyn Bus>,
    pub(super) group: Option<Arc<str>>,
    /// This reader's consumer name in its group.
    pub(super) consumer: String,
}

impl Ctx {
    /// The topic of every entry of `key`; `None` under a layout (each entry has its own).
    pub(super) fn topic_of(&self, key: &str) -> Option<Topic> {
        if self.shared.layout.is_some() {
            return None;
        }
        key.strip_prefix(&self.shared.config.key_prefix)
            .and_then(|t| Topic::new(t).ok())
    }

    /// Decodes an entry of `key`, refusing payloads over `max_payload` (a foreign producer
    /// is not bound by it; subscribers are promised it).
    pub(super) fn decode(
        &self,
        key: &str,
        fields: Vec<Value>,
    ) -> std::result::Result<Message, String> {
        let m = match &self.shared.layout {
            Some(layout) => layout.decode(key, fields)?,
            None => {
                let topic = self
                    .topic_of(key)
                    .ok_or_else(|| format!("key {key:?} names no topic"))?;
                decode_entry(topic, fields)?
            }
        };
        let max = self.shared.config.max_payload;
        if m.payload.len() > max {
            return Err(format!(
                "payload of {} bytes exceeds max_payload {max}",
                m.payload.len()
            ));
        }
        Ok(m)
    }

    pub(super) fn undecodable(&self, key: &str, id: &str, why: &str) {
        Counters::incr(&self.shared.stats.decode_errors);
        tracing::debug!(bus = %self.shared.config.bus, key, id, why, "skipped an undecodable stream entry");
    }

    /// Whether an entry delivered `delivered` times goes to the dead-letter topic now.
    pub(super) fn exhausted(&self, delivered: u32) -> bool {
        self.shared
            .config
            .max_deliveries
            .is_some_and(|m| delivered >= m)
    }

    /// Publishes an entry that was delivered `delivered` times to the dead-letter topic.
    pub(super) async fn dead_letter(
        &self,
        key: &str,
        message: Option<Message>,
        delivered: u32,
    ) -> Result<()> {
        let Some(dead) = self.shared.config.dead_letter.as_deref() else {
            return Ok(());
        };
        let dead = Topic::new(dead)?;
        let topic = match &message {
            Some(m) => Some(m.topic.clone()),
            None => self.topic_of(key),
        };
        let mut message = message.unwrap_or_else(|| Message::new(dead.clone(), Vec::new()));
        message.topic = dead;
        message.headers.insert(
            "dead_letter.topic",
            topic.map(|t| t.as_str().to_string()).unwrap_or_default(),
        );
        message
            .headers
            .insert("dead_letter.deliveries", delivered.to_string());
        if let Some(group) = &self.group {
            message
                .headers
                .insert("dead_letter.group", group.to_string());
        }
        self.via.publish(message).await?;
        Counters::incr(&self.shared.stats.dead_lettered);
        Ok(())
    }

    pub(super) fn redelivered(&self, tx: &QueueSender) {
        Counters::incr(&self.shared.stats.redelivered);
        Counters::incr(&tx.stats().redelivered);
    }
}
