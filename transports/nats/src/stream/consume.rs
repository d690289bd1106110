//! The consume loop of a stream subscription: pull, decode, hand on with an acker, and
//! dead-letter what failed `max_deliveries` times.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::pull;
use async_nats::jetstream::message::AckKind;
use async_nats::jetstream::{self};
use busway::transport::{Counters, QueueSender, TransportDelivery};
use busway::{Bus, Delivery, Message};

use super::acker::JsAcker;
use super::pull::Pull;
use super::returns::{self, Line, PumpStopped};
use super::StreamSetup;
use crate::held::{self, Queued};
use crate::names::SubjectTopics;
use crate::state::Inner;
use crate::wire;

/// Moves one consumer's messages into its subscription's queue; gets or recreates the
/// consumer when it is lost.
pub(super) struct Pump {
    pub(super) inner: Arc<Inner>,
    pub(super) setup: Arc<StreamSetup>,
    pub(super) tx: QueueSender,
    pub(super) via: Arc<dyn Bus>,
    pub(super) config: pull::Config,
    pub(super) durable: bool,
    /// Messages one pull asks for ahead of the handlers (`prefetch`).
    pub(super) prefetch: usize,
    /// `stream/consumer`: the key of the consumer's returned deliveries.
    pub(super) consumer: Arc<str>,
    /// The subscription's line (`block` queues: see `returns`).
    pub(super) line: Option<Arc<Line>>,
    /// Bytes one pull asks for at most (see `pull_bytes`).
    pub(super) pull_bytes: usize,
    /// `block` queues: the bytes queued, and how many the queue may hold (see `held`).
    pub(super) queued: Option<(parking_lot::Mutex<Queued>, usize)>,
}

/// What a subscription bounded by `max_pending` bytes lets one pull ask for, and its queue
/// hold: a quarter, and half. One pull request is open at a time (see `pull`), so at most
/// one pull's bytes are on their way while the queue is full. A pull must
/// take the largest message the server accepts, or one such message would block the
/// consumer (the server ends a pull whose next message is larger than its `max_bytes`).
pub(super) fn pull_bytes(max_pending: usize, max_payload: usize) -> (usize, usize) {
    let largest = held::size(max_payload.saturating_add(MAX_HEADERS));
    ((max_pending / 4).max(largest), (max_pending / 2).max(1))
}

/// Room for the headers a message carries beside its payload in a pull's byte count.
const MAX_HEADERS: usize = 64 * 1024;

/// How often a pump whose queue is over its byte bound looks again.
const ROOM_POLL: Duration = Duration::from_millis(10);

impl Pump {
    pub(super) async fn run(
        self,
        mut consumer: jetstream::consumer::PullConsumer,
        mut topics: SubjectTopics,
    ) {
        // Dropped once the pump and its last pull are gone (see `Line::held`).
        let stopped = Arc::new(PumpStopped(self.line.clone()));
        let setup = &*self.setup;
        let mut backoff = Duration::from_millis(100);
        loop {
            // Dropped (subscription gone, or pulling afresh) with what it prefetched given
            // back to the server (see `pull`).
            let pull = Pull::start(
                consumer.clone(),
                self.inner.client.clone(),
                self.consumer.clone(),
                self.prefetch,
                self.pull_bytes,
                &self.setup,
                stopped.clone(),
            )
            .await;
            match pull {
                Ok(mut pull) => {
                    while let Some(item) = pull.next().await {
                        match item {
                            Ok(msg) => {
                                backoff = Duration::from_millis(100);
                                if !self.handle(setup, &mut topics, msg).await {
                                    return;
                                }
                            }
                            // The consumer was deleted, or the server refuses the pull: get
                            // the consumer afresh (below).
                            Err(e) => {
                                tracing::warn!(bus = %self.inner.name, error = %e, "JetStream pull failed; getting the consumer afresh");
                                break;
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(bus = %self.inner.name, error = %e, "cannot start pulling");
                }
            }
            if self.inner.is_closed() || self.tx.is_closed() {
                return;
            }
            // Lost the consumer (server restart without it, deletion) or the pull loop: get or
            // recreate it by name and continue. A durable keeps its acked position.
            loop {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                if self.inner.is_closed() || self.tx.is_closed() {
                    return;
                }
                match setup.consumer(&self.inner.name, &self.config).await {
                    Ok(c) => {
                        consumer = c;
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(bus = %self.inner.name, error = %e, durable = self.durable, "recreating the consumer failed; retrying");
                    }
                }
            }
        }
    }

    /// Handles one JetStream message; false when the subscription is gone.
    async fn handle(
        &self,
        setup: &StreamSetup,
        topics: &mut SubjectTopics,
        msg: jetstream::Message,
    ) -> bool {
        let (delivered, seq) = match msg.info() {
            Ok(info) => (info.delivered.max(1), info.stream_sequence),
            Err(_) => (1, 0),
        };
        // Deliveries this process gave back unseen (see `returns`) are not attempts.
        let unseen = i64::from(returns::returned(&self.consumer, seq));
        let attempt = u32::try_from((delivered - unseen).max(1)).unwrap_or(u32::MAX);
        let reply = msg.message.reply.clone();
        let (msg, acker) = msg.split();
        let counters = &self.inner.counters;
        let decoded = topics.topic(msg.subject.as_str()).and_then(|topic| {
            wire::with_topic(topic, msg.payload.clone(), msg.headers.as_ref(), None)
        });
        let message = match decoded {
            Ok(m) => m,
            Err(e) => {
                // Undecodable: redelivering cannot help, so it is terminated and counted.
                Counters::incr(&counters.decode_errors);
                Counters::incr(&self.tx.stats().decode_errors);
                tracing::debug!(bus = %self.inner.name, subject = %msg.subject, error = %e, "skipped an undecodable JetStream message");
                let _ = acker.ack_with(AckKind::Term).await;
                returns::forget(&self.consumer, seq);
                return true;
            }
        };
        if setup.max_deliveries > 0 && attempt > setup.max_deliveries {
            self.dead_letter(setup, message, attempt, acker).await;
            returns::forget(&self.consumer, seq);
            return true;
        }
        if attempt > 1 {
            Counters::incr(&counters.redelivered);
            Counters::incr(&self.tx.stats().redelivered);
        }
        let line = match (&self.line, reply) {
            (Some(line), Some(reply)) => Some((line.clone(), line.enter(reply, seq))),
            _ => None,
        };
        let delivery = Delivery::new(message)
            .with_attempt(attempt)
            .with_acker(Box::new(JsAcker::new(
                acker,
                self.inner.clone(),
                seq,
                self.consumer.clone(),
                line,
            )))
            .with_reply_via_if_request(&self.via);
        if let Some((queued, max)) = &self.queued {
            // Over the bound the pump waits (and so stops pulling): the rest stays on the
            // server. A message larger than the bound still goes through an empty queue.
            let size = held::size(msg.length);
            loop {
                let held = queued.lock().bytes();
                if held == 0 || held + size <= *max || self.tx.is_closed() {
                    break;
                }
                tokio::time::sleep(ROOM_POLL).await;
            }
            let sent = self.tx.send(delivery).await;
            if sent {
                queued.lock().pushed(size);
            }
            return sent;
        }
        // A delivery a dropping policy discards is never acked: the server redelivers it
        // after the ack wait, so stream mode stays at least once.
        self.tx.send(delivery).await
    }

    /// Publishes a delivery that failed `max_deliveries` times to `dead_letter` (with
    /// headers `dead_letter_topic` and `dead_letter_attempts`) and terminates it.
    async fn dead_letter(
        &self,
        setup: &StreamSetup,
        message: Message,
        attempt: u32,
        acker: jetstream::message::Acker,
    ) {
        let counters = &self.inner.counters;
        let Some(dl) = &setup.dead_letter else {
            Counters::incr(&counters.dropped);
            tracing::warn!(bus = %self.inner.name, topic = %message.topic, attempt, "delivery failed max_deliveries times and no dead_letter topic is set: terminated");
            let _ = acker.ack_with(AckKind::Term).await;
            return;
        };
        let original = message.topic.clone();
        let mut letter = Message {
            topic: dl.clone(),
            payload: message.payload,
            headers: message.headers,
        };
        letter
            .headers
            .insert("dead_letter_topic", original.as_str());
        letter
            .headers
            .insert("dead_letter_attempts", (attempt - 1).to_string());
        let published = if setup.auto || setup.captures(dl) {
            setup.publish(&self.inner, letter).await
        } else {
            self.inner.publish_core(letter).await
        };
        match published {
            Ok(()) => {
                Counters::incr(&counters.dead_lettered);
                let _ = acker.ack_with(AckKind::Term).await;
            }
            Err(e) => {
                // Keep it: it comes back later and the dead-lettering is tried again.
                Counters::incr(&counters.errors);
                tracing::warn!(bus = %self.inner.name, topic = %original, error = %e, "cannot publish a dead letter; will retry");
                let _ = acker
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
            }
        }
    }
}
