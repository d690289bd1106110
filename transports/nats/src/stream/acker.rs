//! Settling a JetStream delivery: ack, nack (with delay).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::message::AckKind;
use async_nats::jetstream::{self};
use async_trait::async_trait;
use busway::transport::{Acker, Counters};
use busway::{Error, ErrorKind, Result};

use crate::state::Inner;

/// Acks, naks (with delay) a JetStream delivery.
pub(super) struct JsAcker {
    acker: jetstream::message::Acker,
    /// The bus's name and counters (one reference count, not a copy of the name).
    inner: Arc<Inner>,
}

impl std::fmt::Debug for JsAcker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsAcker")
            .field("bus", &self.inner.name)
            .finish()
    }
}

impl JsAcker {
    pub(super) fn new(acker: jetstream::message::Acker, inner: Arc<Inner>) -> JsAcker {
        JsAcker { acker, inner }
    }

    async fn send(&self, kind: AckKind, what: &str) -> Result<()> {
        self.acker.ack_with(kind).await.map_err(|e| {
            Counters::incr(&self.inner.counters.errors);
            Error::new(
                ErrorKind::Connection,
                format!("bus {:?}: {what} failed: {e}", self.inner.name),
            )
        })
    }
}

#[async_trait]
impl Acker for JsAcker {
    async fn ack(&self) -> Result<()> {
        self.send(AckKind::Ack, "ack").await
    }

    async fn nack(&self, delay: Option<Duration>) -> Result<()> {
        self.send(AckKind::Nak(delay), "nack").await
    }
}
