//! What a transport author needs: how to write a transport.
//!
//! Engine code never imports this module; it holds an `Arc<dyn Bus>`. A transport crate
//! (`busway-redis`, `busway-nats`) is built from the pieces here.
//!
//! # How to write a transport
//! 1. **A bus type** implementing [`Bus`](crate::Bus). `publish` returns a [`BoxFuture`]
//!    written out (no `async fn`), so a transport that finishes the work synchronously can
//!    return a ready future; the other methods are `#[async_trait]`.
//! 2. **Subscriptions** are made with [`TransportSubscription::channel`]: the transport keeps
//!    the [`QueueSender`] and pushes [`Delivery`](crate::Delivery)s into it ([`QueueSender::try_send`] never
//!    waits; [`QueueSender::send`] waits under `block`). The queue applies the subscription's
//!    overflow policy and counts drops. Attach a guard with
//!    [`TransportSubscription::with_guard`] whose `Drop` releases broker state.
//! 3. **Deliveries** are built with [`TransportDelivery`]: stream-mode deliveries carry an
//!    [`Acker`] that settles them with the broker ([`Acker::ack_with`] batches acks of one
//!    transport); a request's delivery carries the bus to reply on.
//! 4. **Counters**: the bus keeps one [`Counters`] and reports it from `stats()`.
//! 5. **Config**: a [`TransportFactory`] registered under a kind name reads the bus's keys
//!    with [`BuildContext::options`] (`#[serde(deny_unknown_fields)]`), checks them in
//!    [`TransportFactory::validate`] without connecting (what `busway check` runs), and
//!    builds the bus in [`TransportFactory::build`]. Shared knobs use the shared types:
//!    [`Framing`], [`OnDisconnect`], [`ConfigDuration`].
//! 6. **The contract** is the conformance suite in `busway-testkit`: a transport runs it for
//!    each mode it supports, and skips only what its [`Capabilities`](crate::Capabilities)
//!    say it cannot do.

use std::future::Future;
use std::pin::Pin;

pub use crate::bus::{is_inbox, request_via_inbox, INBOX_PREFIX};
pub use crate::config::{ConfigDuration, Framing, OnDisconnect, QueueDefaults};
pub use crate::delivery::{ack_each, Acker, TransportDelivery};
pub use crate::message::{new_message_id, now_micros};
pub use crate::queue::{QueueSender, TrySend};
pub use crate::registry::{BuildContext, TransportFactory};
pub use crate::stats::Counters;
pub use crate::subscription::TransportSubscription;
pub use crate::url::{redact_url, scrub_secrets, split_userinfo, url_secrets};

/// The future a [`Bus::publish`](crate::Bus::publish) returns: boxed, `Send`, borrowing the
/// bus.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
