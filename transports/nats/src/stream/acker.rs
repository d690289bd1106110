//! Settling a JetStream delivery: ack, nack (with delay); one no handler took is given back
//! when its subscription goes (see `returns`).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::message::AckKind;
use async_nats::jetstream::{self};
use async_trait::async_trait;
use busway::transport::{Acker, Counters};
use busway::{Error, ErrorKind, Result};

use super::returns::{self, Line};
use crate::state::Inner;

/// Acks, naks (with delay) a JetStream delivery.
pub(super) struct JsAcker {
    acker: jetstream::message::Acker,
    /// The bus's name and counters (one reference count, not a copy of the name).
    inner: Arc<Inner>,
    /// The message's stream sequence, to forget its returns once acked.
    seq: u64,
    /// Its subscription's line and its position in it (`block` queues only).
    line: Option<(Arc<Line>, u64)>,
    consumer: Arc<str>,
}

impl std::fmt::Debug for JsAcker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsAcker")
            .field("bus", &self.inner.name)
            .field("seq", &self.seq)
            .finish()
    }
}

impl JsAcker {
    pub(super) fn new(
        acker: jetstream::message::Acker,
        inner: Arc<Inner>,
        seq: u64,
        consumer: Arc<str>,
        line: Option<(Arc<Line>, u64)>,
    ) -> JsAcker {
        JsAcker {
            acker,
            inner,
            seq,
            line,
            consumer,
        }
    }

    async fn send(&self, kind: AckKind, what: &str) -> Result<()> {
        if let Some((line, at)) = &self.line {
            line.settled(*at);
        }
        self.acker.ack_with(kind).await.map_err(|e| {
            Counters::incr(&self.inner.counters.errors);
            Error::new(
                ErrorKind::Connection,
                format!("bus {:?}: {what} failed: {e}", self.inner.name),
            )
        })
    }
}

impl Drop for JsAcker {
    fn drop(&mut self) {
        if let Some((line, at)) = &self.line {
            line.dropped(*at);
        }
    }
}

#[async_trait]
impl Acker for JsAcker {
    async fn ack(&self) -> Result<()> {
        self.send(AckKind::Ack, "ack").await?;
        returns::forget(&self.consumer, self.seq);
        Counters::incr(&self.inner.counters.acked);
        Ok(())
    }

    async fn nack(&self, delay: Option<Duration>) -> Result<()> {
        self.send(AckKind::Nak(delay), "nack").await?;
        Counters::incr(&self.inner.counters.nacked);
        Ok(())
    }
}
