//! busway's own pull on a JetStream consumer: an inbox subscription and one pull request
//! (`$JS.API.CONSUMER.MSG.NEXT`) at a time on it, so that stopping can end the pull without
//! losing what the server was sending.
//!
//! async-nats's pull stream keeps its inbox subscription to itself and unsubscribes it at
//! once when dropped: a message the server sent before it saw the unsubscribe is thrown
//! away by the client, and comes back only after the ack wait, counted as a delivery. A
//! [`Pull`] dropped instead *drains* its inbox (unsubscribes on the server, and keeps the
//! subscription until the server answered a ping sent after it: the server sends nothing
//! to the inbox after the unsubscribe, and what it sent before arrives before that answer),
//! then gives back (naks, see `returns`) everything that arrived.

use std::sync::{Arc, Weak};
use std::time::Duration;

use async_nats::jetstream::consumer::pull::BatchConfig;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{self};
use async_nats::{StatusCode, Subject, Subscriber};
use futures::StreamExt;
use tokio::time::Instant;

use super::returns::{self, PumpStopped};
use super::StreamSetup;

/// How long one pull request waits on the server for messages. Stopping does not wait for
/// it (see the module docs); it bounds how long a request lost with a server restart is
/// waited for.
const EXPIRES: Duration = Duration::from_secs(2);

/// How long past `EXPIRES` the server's end of a request (status 408) is waited for before
/// asking again.
const GRACE: Duration = Duration::from_secs(1);

/// How long a stopped pull waits for its inbox to drain.
const DRAIN_WAIT: Duration = Duration::from_secs(2);

/// One consumer's pull: its inbox, and the request open on it.
pub(super) struct Pull {
    consumer: PullConsumer,
    /// What the messages are acked through.
    js: jetstream::Context,
    subscriber: Option<Subscriber>,
    inbox: Subject,
    client: async_nats::Client,
    /// `stream/consumer` (see `returns`).
    key: Arc<str>,
    /// Messages and bytes one request asks for.
    batch: usize,
    max_bytes: usize,
    /// Messages the open request may still send; 0 when none is open.
    open: usize,
    /// When the open request should have been ended by the server.
    deadline: Instant,
    /// Where the drain of a dropped pull is registered, for `Bus::close` to wait for.
    setup: Weak<StreamSetup>,
    /// Kept until the inbox is drained: held give-backs go out only then (see `Line`).
    stopped: Arc<PumpStopped>,
}

impl Pull {
    /// Subscribes a new inbox for `consumer`; no request is sent before [`Pull::next`].
    pub(super) async fn start(
        consumer: PullConsumer,
        client: async_nats::Client,
        key: Arc<str>,
        batch: usize,
        max_bytes: usize,
        setup: &Arc<StreamSetup>,
        stopped: Arc<PumpStopped>,
    ) -> Result<Pull, async_nats::SubscribeError> {
        let inbox = Subject::from(client.new_inbox());
        let subscriber = client.subscribe(inbox.clone()).await?;
        Ok(Pull {
            consumer,
            js: setup.js.clone(),
            subscriber: Some(subscriber),
            inbox,
            client,
            key,
            batch: batch.max(1),
            max_bytes,
            open: 0,
            deadline: Instant::now(),
            setup: Arc::downgrade(setup),
            stopped,
        })
    }

    /// The next message; `None` when the client closed; an error when the server ended a
    /// request in a way asking again cannot mend (the consumer was deleted, ...): the
    /// caller gets the consumer afresh.
    pub(super) async fn next(&mut self) -> Option<Result<jetstream::Message, String>> {
        loop {
            if self.open == 0 {
                let request = BatchConfig {
                    batch: self.batch,
                    max_bytes: self.max_bytes,
                    expires: Some(EXPIRES),
                    ..Default::default()
                };
                if let Err(e) = self
                    .consumer
                    .request_batch(request, self.inbox.clone())
                    .await
                {
                    return Some(Err(format!("cannot send a pull request: {e}")));
                }
                self.open = self.batch;
                self.deadline = Instant::now() + EXPIRES + GRACE;
            }
            let subscriber = self.subscriber.as_mut()?;
            let message = match tokio::time::timeout_at(self.deadline, subscriber.next()).await {
                Ok(Some(message)) => message,
                Ok(None) => return None,
                // The server never ended the request (it restarted, or the connection was
                // lost meanwhile): ask again.
                Err(_) => {
                    self.open = 0;
                    continue;
                }
            };
            match message.status {
                None | Some(StatusCode::OK) => {
                    self.open -= 1;
                    return Some(Ok(jetstream::Message {
                        message,
                        context: self.js.clone(),
                    }));
                }
                Some(StatusCode::IDLE_HEARTBEAT) => {}
                // Expired, or nothing to send: ask again.
                Some(StatusCode::TIMEOUT) | Some(StatusCode::NOT_FOUND) => self.open = 0,
                Some(StatusCode::REQUEST_TERMINATED)
                    if message
                        .description
                        .as_deref()
                        .is_some_and(|d| d.contains("MaxBytes") || d.contains("Completed")) =>
                {
                    // The request's bytes are used up (the next message is larger than
                    // what is left of them).
                    self.open = 0;
                }
                Some(status) => {
                    self.open = 0;
                    return Some(Err(format!(
                        "pull request ended with status {status}: {}",
                        message.description.as_deref().unwrap_or("")
                    )));
                }
            }
        }
    }
}

impl Drop for Pull {
    fn drop(&mut self) {
        let Some(mut subscriber) = self.subscriber.take() else {
            return;
        };
        // Without a runtime the subscriber is dropped (unsubscribed) here.
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let client = self.client.clone();
        let js = self.js.clone();
        let key = self.key.clone();
        let stopped = self.stopped.clone();
        let task = rt.spawn(async move {
            if subscriber.drain().await.is_ok() {
                let _ = tokio::time::timeout(DRAIN_WAIT, async {
                    // The server does not redeliver a nak into this inbox: it has seen the
                    // unsubscribe before the nak (same connection).
                    while let Some(message) = subscriber.next().await {
                        if !matches!(message.status, None | Some(StatusCode::OK)) {
                            continue;
                        }
                        let Some(reply) = message.reply.clone() else {
                            continue;
                        };
                        let seq = jetstream::Message {
                            message,
                            context: js.clone(),
                        }
                        .info()
                        .map(|i| i.stream_sequence)
                        .unwrap_or(0);
                        returns::give_back(&client, &key, reply, seq);
                    }
                })
                .await;
            }
            drop(stopped);
        });
        if let Some(setup) = self.setup.upgrade() {
            setup.draining(task);
        }
    }
}
