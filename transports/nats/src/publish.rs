//! The core NATS publish path: a busway message becomes an async-nats message, and the
//! publish future waits for room in the client's command buffer for at most
//! `publish_timeout`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use async_nats::message::OutboundMessage;
use busway::transport::{BoxFuture, Counters};
use busway::{Error, ErrorKind, Message, Result, Topic};

use crate::names;
use crate::state::Inner;
use crate::wire;

/// [`Bus::publish`](busway::Bus::publish) on core NATS (broadcast mode, and replies to
/// inboxes on a stream bus), counted in the bus's `published` / `errors`.
pub(crate) fn publish(inner: &Inner, message: Message) -> BoxFuture<'_, Result<()>> {
    let (outbound, topic) = match inner.outbound(message) {
        Ok(prepared) => prepared,
        Err(e) => return Box::pin(std::future::ready(Err(inner.failed(e)))),
    };
    // A message with neither headers nor a reply subject (the usual one) goes through
    // `publish`, whose future is smaller than `publish_message`'s; each has a box of its own
    // type, so the usual one does not pay for the larger.
    match outbound {
        OutboundMessage {
            subject,
            reply: None,
            payload,
            headers: None,
        } => {
            Box::pin(CoreSend::new(inner, topic, inner.client.publish(subject, payload)).counted())
        }
        outbound => Box::pin(inner.core_send(outbound, topic).counted()),
    }
}

impl Inner {
    /// Counts a publish's outcome.
    pub(crate) fn published(&self, result: Result<()>) -> Result<()> {
        match result {
            Ok(()) => {
                Counters::incr(&self.counters.published);
                Ok(())
            }
            Err(e) => Err(self.failed(e)),
        }
    }

    /// Core NATS publish (broadcast mode, and replies to inboxes in stream mode).
    pub(crate) async fn publish_core(&self, message: Message) -> Result<()> {
        let (outbound, topic) = self.outbound(message)?;
        self.core_send(outbound, topic).await
    }

    /// The async-nats message for `message`, and its topic (for error messages).
    ///
    /// # Errors
    /// [`ErrorKind::Encode`] when a header cannot travel as a NATS header.
    fn outbound(&self, message: Message) -> Result<(OutboundMessage, Topic)> {
        let Message {
            topic,
            payload,
            headers: h,
        } = message;
        let headers = wire::encode_framed(self.options.framing, &topic, &h)?;
        let outbound = OutboundMessage {
            subject: names::subject_of(&topic),
            // Reply subjects are request inboxes, each used once: copied, not cached.
            reply: h
                .reply_to
                .as_ref()
                .map(|r| async_nats::Subject::from(r.as_str())),
            payload,
            headers,
        };
        Ok((outbound, topic))
    }

    /// The core publish of `outbound`: a future that holds the async-nats send and nothing
    /// else of the message (a publish future is boxed and moved on every publish, so its size
    /// is a per-message cost).
    fn core_send(
        &self,
        outbound: OutboundMessage,
        topic: Topic,
    ) -> CoreSend<
        '_,
        impl Future<Output = std::result::Result<(), async_nats::PublishError>> + Send + '_,
    > {
        use async_nats::client::traits::Publisher;
        // `publish_message` takes every kind of message as it is; the `publish*` variants
        // would make the future an `Either` of four.
        CoreSend::new(self, topic, self.client.publish_message(outbound))
    }

    /// The error for a publish async-nats refused.
    fn send_error(&self, topic: &Topic, e: async_nats::PublishError) -> Error {
        let too_large = e.kind() == async_nats::client::PublishErrorKind::MaxPayloadExceeded;
        self.publish_error(topic, e.to_string(), too_large, e)
    }

    fn publish_error(
        &self,
        topic: &Topic,
        what: String,
        too_large: bool,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Error {
        let kind = if too_large {
            ErrorKind::PayloadTooLarge
        } else {
            ErrorKind::Connection
        };
        Error::new(
            kind,
            // `what` only when it is not the source's own text: the source is printed after.
            if what == source.to_string() {
                format!(
                    "bus {:?}: publish on {:?} failed",
                    self.name,
                    topic.as_str()
                )
            } else {
                format!(
                    "bus {:?}: publish on {:?} failed: {what}",
                    self.name,
                    topic.as_str()
                )
            },
        )
        .with_source(source)
    }
}

pin_project_lite::pin_project! {
    /// A core publish waiting for room in the client's command buffer, for at most
    /// `publish_timeout` (see [`Inner::core_send`]).
    pub(crate) struct CoreSend<'a, F> {
        #[pin]
        send: F,
        inner: &'a Inner,
        topic: Topic,
        timer: Option<Pin<Box<tokio::time::Sleep>>>,
        // Whether the outcome counts in the bus's `published` / `errors` (a `Bus::publish`).
        // Counted here: a `map` around the boxed future would add a poll layer per publish.
        counted: bool,
    }
}

impl<'a, F> CoreSend<'a, F> {
    fn new(inner: &'a Inner, topic: Topic, send: F) -> Self {
        CoreSend {
            send,
            inner,
            topic,
            timer: None,
            counted: false,
        }
    }

    /// Counts the outcome as a `Bus::publish`'s.
    fn counted(mut self) -> Self {
        self.counted = true;
        self
    }
}

impl<F> Future for CoreSend<'_, F>
where
    F: Future<Output = std::result::Result<(), async_nats::PublishError>>,
{
    type Output = Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let this = self.project();
        let inner = *this.inner;
        if let Poll::Ready(sent) = this.send.poll(cx) {
            let sent = sent.map_err(|e| inner.send_error(this.topic, e));
            return Poll::Ready(if *this.counted {
                inner.published(sent)
            } else {
                sent
            });
        }
        // The command buffer almost always has room: the timer is armed only when the send
        // really waits. A send that is pending only because this task used up its Tokio
        // budget (a publisher with many publishes in flight) is woken again at once by
        // Tokio, and arming a timer for it would cost a clock read and a timer-wheel entry
        // per publish.
        if this.timer.is_none() && !tokio::task::coop::has_budget_remaining() {
            return Poll::Pending;
        }
        let timeout = inner.options.publish_timeout();
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        std::task::ready!(timer.as_mut().poll(cx));
        let e = Error::new(
            ErrorKind::BufferFull,
            format!(
                "bus {:?}: publish on {:?} found the client's outage buffer full (publish_buffer) for {timeout:?} while {}",
                inner.name,
                this.topic.as_str(),
                if inner.is_connected() { "connected" } else { "disconnected" }
            ),
        );
        Poll::Ready(Err(if *this.counted { inner.failed(e) } else { e }))
    }
}
