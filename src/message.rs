//! Messages and their headers.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::error::Result;
use crate::topic::Topic;

/// Metadata that travels with a payload.
///
/// Every field is optional; a message with default headers costs nothing to clone. Transports
/// carry all of them (native headers, stream fields or a frame) unless the bus uses `raw`
/// framing, which carries the payload alone.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Headers {
    /// A unique id for the message (used for de-duplication on mirrored routes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// When the message was created, in microseconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp_us: Option<u64>,
    /// The app that published it (`[app] name` in the config).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The payload's content type, e.g. `application/json` or `application/msgpack`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// Where a reply to this message should be published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<Topic>,
    /// Ties a reply to its request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// Free key-values, in insertion order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra: Vec<(String, String)>,
}

impl Headers {
    /// Whether no header is set.
    pub fn is_empty(&self) -> bool {
        self == &Headers::default()
    }

    /// The value of a free key, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.extra
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Sets a free key, replacing an earlier value.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<String>) {
        let key = key.into();
        let value = value.into();
        match self.extra.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => *v = value,
            None => self.extra.push((key, value)),
        }
    }
}

/// A message: a topic, a payload and headers.
///
/// Cloning never copies the payload (`Bytes` is reference-counted), nor the topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Where the message is published.
    pub topic: Topic,
    /// The payload bytes, opaque to busway.
    pub payload: Bytes,
    /// Metadata.
    pub headers: Headers,
}

impl Message {
    /// A message with empty headers.
    pub fn new(topic: Topic, payload: impl Into<Bytes>) -> Message {
        Message {
            topic,
            payload: payload.into(),
            headers: Headers::default(),
        }
    }

    /// Parses `topic` and builds a message with empty headers.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidTopic`](crate::ErrorKind::InvalidTopic) when the topic is invalid.
    pub fn try_new(topic: &str, payload: impl Into<Bytes>) -> Result<Message> {
        Ok(Message::new(Topic::new(topic)?, payload))
    }

    /// Sets the message id.
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.headers.id = Some(id.into());
        self
    }

    /// Sets the content type.
    pub fn with_content_type(mut self, content_type: impl Into<String>) -> Self {
        self.headers.content_type = Some(content_type.into());
        self
    }

    /// Sets a free header.
    pub fn with_header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(key, value);
        self
    }

    /// Stamps the current time in `timestamp_us`.
    pub fn stamped(mut self) -> Self {
        self.headers.timestamp_us = Some(now_micros());
        self
    }
}

/// Microseconds since the Unix epoch, now.
pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A fresh message id: 128 random bits as 32 hex characters.
pub fn new_message_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}
