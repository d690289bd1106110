//! Stream mode on JetStream: the bus's stream (`setup`), publishing into it and requests
//! (here), consumers (`consumer`), the pull on a consumer (`pull`), the consume loop with
//! dead letters (`consume`) and acks (`acker`).
//!
//! - The stream (`stream`, `subjects`, limits, `replicas`, `storage`, `duplicate_window` from
//!   config) is created at build. An existing one is used as it is, with a warning naming the
//!   keys that differ, unless `update_stream` is set.
//! - Every publish carries the message id as `Nats-Msg-Id`; one without a PubAck is retried
//!   (`publish_retries`, `retry_backoff`) with the same id, so the stream stores it once.
//! - Without `subjects` in config the stream's subjects follow use: it starts with
//!   `<bus>.>`, and the first publish or subscribe under a new first token `t` adds `t` and
//!   `t.>` to the stream (one stream update per new token; subjects other processes added are
//!   kept). Topics whose first token is a wildcard cannot be derived and need `subjects`.
//!   With `subjects` set, anything outside them is refused with `ErrorKind::Unsupported`.
//! - A subscription with a group uses the durable pull consumer named by `durable`, by
//!   default `<group>-<hash of pattern>` (group name with characters NATS refuses in
//!   consumer names replaced by `_`, FNV-1a-32 of the pattern in 8 hex digits): every member
//!   of the group, in any process, shares it and the server splits the messages. It outlives
//!   the subscription, so the group resumes where it left off.
//! - A subscription without a group gets its own pull consumer `busway-<random>` with explicit
//!   acks (not an "ordered consumer", which cannot ack). It is deleted when the subscription
//!   drops or the bus closes, and the server removes it after `inactive_threshold` (1 hour) if
//!   the process died. It is durable on the server, so it also survives a server restart.
//! - `max_deliveries` is enforced by busway, not the server: a delivery whose attempt exceeds it
//!   is published to `dead_letter` and terminated (or terminated and counted as dropped when
//!   there is no dead-letter topic). Subscribers see attempts `1..=max_deliveries`.

mod acker;
mod consume;
mod consumer;
mod lag;
mod pull;
mod returns;
mod setup;

use std::collections::HashSet;
use std::future::{Future, IntoFuture};
use std::time::Duration;

use std::sync::atomic::Ordering;

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::{self};
use busway::transport::new_message_id;
use busway::{Bus, Error, ErrorKind, Message, Pattern, Result, Topic};
use futures::{FutureExt, StreamExt, TryFutureExt};
use parking_lot::Mutex;

use crate::state::Inner;
use crate::wire;

/// The bus's JetStream stream and what its subscriptions need.
#[derive(Debug)]
pub(crate) struct StreamSetup {
    js: jetstream::Context,
    name: String,
    subjects: parking_lot::RwLock<Vec<Pattern>>,
    /// No `subjects` in config: new first tokens are added to the stream on first use.
    pub(crate) auto: bool,
    /// Serialises stream updates for new subjects.
    growing: tokio::sync::Mutex<()>,
    max_deliveries: u32,
    dead_letter: Option<Topic>,
    /// The durable consumer name template of groups (`durable`).
    durable: String,
    /// Per-subscription consumers to delete on close.
    ephemeral: Mutex<HashSet<String>>,
    /// The subscriptions' lines, to give back what their queues hold on close.
    lines: Mutex<Vec<std::sync::Weak<returns::Line>>>,
    /// Stopped pulls draining their inboxes (see `pull`), for close to wait for.
    drains: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// Whether sending a publish again can succeed: no PubAck in time (a leader change, a frozen
/// server), the connection lost, or no stream leader answering for a moment.
fn retryable(e: &PublishError) -> bool {
    matches!(
        e.kind(),
        PublishErrorKind::TimedOut
            | PublishErrorKind::BrokenPipe
            | PublishErrorKind::StreamNotFound
            | PublishErrorKind::MaxAckPending
    )
}

fn js_err(what: String, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    // The source's text is printed after the message (`Error`'s `Display`).
    Error::new(ErrorKind::Broker, what).with_source(e)
}

impl StreamSetup {
    /// Whether the stream stores messages published on `topic`.
    pub(crate) fn captures(&self, topic: &Topic) -> bool {
        self.subjects.read().iter().any(|p| p.matches(topic))
    }

    fn subject_list(&self) -> Vec<String> {
        self.subjects
            .read()
            .iter()
            .map(|p| p.as_str().to_string())
            .collect()
    }

    /// The topic and the client's publish of `message` (headers encoded per the framing),
    /// carrying `<topic>:<message id>` as `Nats-Msg-Id` (a new id when the message has none),
    /// so a publish sent again is stored once within the stream's duplicate window.
    fn prepare(
        &self,
        inner: &Inner,
        message: Message,
    ) -> Result<(Topic, jetstream::message::PublishMessage)> {
        let Message {
            topic,
            payload,
            headers: h,
        } = message;
        let publish = jetstream::message::PublishMessage::build().payload(payload);
        let publish = match wire::encode_framed(inner.options.framing, &topic, &h)? {
            Some(map) => publish.headers(map),
            None => publish,
        };
        // With the topic: the same message sent on to another topic of the stream (a dead
        // letter, a forward) is another message, not a duplicate.
        let publish = match &h.id {
            Some(id) => publish.message_id(format!("{}:{id}", topic.as_str())),
            None => publish.message_id(new_message_id()),
        };
        Ok((topic, publish))
    }

    /// Publishes and waits for the PubAck. Concurrent publishers are not serialised: each
    /// awaits its own ack while the client pipelines the writes.
    ///
    /// The future is boxed on every publish, so it is kept small: the message becomes the
    /// client's publish before the future is made, the future holds the client's send and
    /// then its ack (never both), and the rare growing of the stream for a new first token
    /// and the retries (`publish_retries`) are boxed on their own.
    pub(crate) fn publish<'a>(
        &'a self,
        inner: &'a Inner,
        message: Message,
    ) -> impl Future<Output = Result<()>> + Send + 'a {
        use futures::future::Either;
        if !self.captures(&message.topic) {
            return Either::Left(Box::pin(async move {
                self.ensure_topic(&inner.name, &message.topic).await?;
                self.send(inner, message).await
            }));
        }
        Either::Right(self.send(inner, message))
    }

    /// One publish and its PubAck.
    fn attempt(
        &self,
        subject: async_nats::Subject,
        publish: jetstream::message::PublishMessage,
    ) -> impl Future<Output = std::result::Result<(), PublishError>> + Send + '_ {
        self.js
            .send_publish(subject, publish)
            .and_then(IntoFuture::into_future)
            .map_ok(drop)
    }

    /// [`StreamSetup::publish`] of a topic the stream holds: the first attempt, then (only
    /// when it failed in a way a retry can mend) the retries, boxed.
    fn send<'a>(
        &'a self,
        inner: &'a Inner,
        message: Message,
    ) -> impl Future<Output = Result<()>> + Send + 'a {
        use futures::future::{ready, Either};
        let (topic, publish) = match self.prepare(inner, message) {
            Ok(prepared) => prepared,
            Err(e) => return Either::Left(ready(Err(e))),
        };
        let subject = async_nats::Subject::from(topic.as_str());
        let retries = inner.options.publish_retries();
        // `publish_timeout` bounds the whole publish, retries included.
        let deadline = tokio::time::Instant::now() + inner.options.publish_timeout();
        // Kept for a retry: the payload is shared, the headers are copied.
        let again = (retries > 0).then(|| (subject.clone(), publish.clone()));
        Either::Right(
            self.attempt(subject, publish)
                .then(move |first| match (first, again) {
                    (Err(e), Some((subject, publish))) if retryable(&e) => Either::Left(Box::pin(
                        self.retry(inner, subject, publish, retries, deadline, e),
                    )),
                    (first, _) => Either::Right(ready(first.map(|()| 1).map_err(|e| (e, 1)))),
                })
                .map(move |outcome| {
                    outcome
                        .map(drop)
                        .map_err(|(e, attempts)| self.publish_error(inner, &topic, e, attempts))
                }),
        )
    }

    /// Sends `publish` again up to `retries` times, waiting `retry_backoff` (doubling) before
    /// each, while time is left before `deadline` (each retry's ack wait is cut to it); stops
    /// at the first PubAck or at an error a retry cannot mend. On failure, the last error and
    /// the attempts made.
    async fn retry(
        &self,
        inner: &Inner,
        subject: async_nats::Subject,
        publish: jetstream::message::PublishMessage,
        retries: u32,
        deadline: tokio::time::Instant,
        mut last: PublishError,
    ) -> std::result::Result<u32, (PublishError, u32)> {
        let mut attempts = 1;
        for n in 1..=retries {
            let backoff = inner.options.retry_backoff(n);
            if tokio::time::Instant::now() + backoff >= deadline {
                break;
            }
            tokio::time::sleep(backoff).await;
            inner.publish_retries.fetch_add(1, Ordering::Relaxed);
            attempts += 1;
            tracing::debug!(bus = %inner.name, subject = %subject, retry = n, error = %last, "JetStream publish not acknowledged; sending it again");
            let attempt = self.attempt(subject.clone(), publish.clone());
            match tokio::time::timeout_at(deadline, attempt).await {
                Ok(Ok(())) => return Ok(attempts),
                Ok(Err(e)) if retryable(&e) => last = e,
                Ok(Err(e)) => return Err((e, attempts)),
                // Out of time: the last PubAck error says what went wrong.
                Err(_) => break,
            }
        }
        Err((last, attempts))
    }

    /// The busway error for a publish that was not acknowledged after `attempts` attempts.
    fn publish_error(&self, inner: &Inner, topic: &Topic, e: PublishError, attempts: u32) -> Error {
        let kind = match e.kind() {
            PublishErrorKind::MaxPayloadExceeded => ErrorKind::PayloadTooLarge,
            PublishErrorKind::StreamNotFound => ErrorKind::Broker,
            _ if !inner.is_connected() => ErrorKind::Connection,
            PublishErrorKind::TimedOut => ErrorKind::Timeout,
            PublishErrorKind::BrokenPipe => ErrorKind::Connection,
            _ => ErrorKind::Broker,
        };
        let tries = if attempts > 1 {
            format!(" after {attempts} attempts")
        } else {
            String::new()
        };
        Error::new(
            kind,
            format!(
                "bus {:?}: publish on {:?} to JetStream stream {:?} was not acknowledged{tries}",
                inner.name,
                topic.as_str(),
                self.name
            ),
        )
        .with_source(e)
    }

    /// A request on a stream bus: the request is stored in the stream (so a responder may
    /// be offline for a while) and the reply comes back on a core NATS inbox. JetStream
    /// cannot tell that nobody listens, so a missing responder is a timeout.
    pub(crate) async fn request(
        &self,
        inner: &Inner,
        bus: &dyn Bus,
        mut message: Message,
        timeout: Duration,
    ) -> Result<Message> {
        let inbox = Topic::new(inner.client.new_inbox())?;
        let mut replies = inner
            .client
            .subscribe(inbox.as_str().to_string())
            .await
            .map_err(|e| {
                inner.failed(
                    Error::new(
                        ErrorKind::Connection,
                        format!("bus {:?}: cannot subscribe to a reply inbox", inner.name),
                    )
                    .with_source(e),
                )
            })?;
        let topic = message.topic.clone();
        message.headers.reply_to = Some(inbox);
        if message.headers.correlation_id.is_none() {
            message.headers.correlation_id = Some(new_message_id());
        }
        bus.publish(message).await?;
        match tokio::time::timeout(timeout, replies.next()).await {
            Ok(Some(reply)) => wire::to_message(
                reply.subject.as_str(),
                reply.payload,
                reply.headers.as_ref(),
                None,
            ),
            Ok(None) => Err(inner.closed_error()),
            Err(_) => Err(inner.failed(Error::new(
                ErrorKind::Timeout,
                format!(
                    "request on {:?} (bus {:?}): no reply within {timeout:?}",
                    topic.as_str(),
                    inner.name
                ),
            ))),
        }
    }

    /// Registers the drain of a stopped pull.
    fn draining(&self, task: tokio::task::JoinHandle<()>) {
        let mut drains = self.drains.lock();
        drains.retain(|t| !t.is_finished());
        drains.push(task);
    }

    /// The bus is closing and its pumps have stopped: waits (at most 3 s) until their pulls
    /// have drained their inboxes and given back what arrived.
    pub(crate) async fn drained(&self) {
        let drains: Vec<_> = self.drains.lock().drain(..).collect();
        let _ =
            tokio::time::timeout(Duration::from_secs(3), futures::future::join_all(drains)).await;
    }

    /// The bus is closing: gives back to the server every delivery still queued that no
    /// handler took (it could not be acked any more).
    pub(crate) fn give_back_queued(&self) {
        let lines: Vec<_> = self.lines.lock().drain(..).collect();
        for line in lines.iter().filter_map(std::sync::Weak::upgrade) {
            line.close();
        }
    }

    /// Deletes the per-subscription consumers (groups keep theirs: they are the group's
    /// position in the stream).
    pub(crate) async fn close(&self) {
        let names: Vec<String> = self.ephemeral.lock().drain().collect();
        if let Ok(stream) = self.js.get_stream_no_info(&self.name).await {
            for name in names {
                let _ = tokio::time::timeout(Duration::from_secs(2), stream.delete_consumer(&name))
                    .await;
            }
        }
    }
}
