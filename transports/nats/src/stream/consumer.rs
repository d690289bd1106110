//! JetStream consumers: one durable pull consumer per group and pattern, or one of the
//! subscription's own; the subscription that reads it; deleting the group-less ones.

use std::sync::{Arc, Weak};
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::{self};
use busway::config::DEFAULT_ACK_TIMEOUT;
use busway::transport::{new_message_id, TransportSubscription};
use busway::{
    Bus, Error, ErrorKind, Overflow, Pattern, Result, StartFrom, SubscribeOptions, Subscription,
};

use super::consume::{pull_bytes, Pump};
use super::returns::{Line, LineGuard};
use super::{js_err, StreamSetup};
use crate::held::Queued;
use crate::names::SubjectTopics;
use crate::state::Inner;

/// How long the server keeps a group-less subscription's consumer after its process vanished.
const ORPHAN_CONSUMER_TTL: Duration = Duration::from_secs(3600);

impl StreamSetup {
    /// The pull consumer of one subscription: named `name`, durable for a group.
    fn consumer_config(
        &self,
        name: &str,
        durable: bool,
        pattern: &Pattern,
        options: &SubscribeOptions,
    ) -> pull::Config {
        pull::Config {
            durable_name: Some(name.to_string()),
            filter_subject: pattern.as_str().to_string(),
            deliver_policy: match options.start {
                StartFrom::New => DeliverPolicy::New,
                StartFrom::Beginning => DeliverPolicy::All,
            },
            ack_policy: AckPolicy::Explicit,
            ack_wait: options.ack_timeout.unwrap_or(DEFAULT_ACK_TIMEOUT),
            // busway enforces max_deliveries itself (dead letters): the server never gives up.
            max_deliver: -1,
            inactive_threshold: if durable {
                Duration::ZERO
            } else {
                ORPHAN_CONSUMER_TTL
            },
            ..Default::default()
        }
    }

    /// Gets the consumer, creating it or updating its ack wait as needed.
    pub(super) async fn consumer(
        &self,
        bus: &str,
        config: &pull::Config,
    ) -> Result<jetstream::consumer::PullConsumer> {
        let name = config.durable_name.clone().unwrap_or_default();
        let what = format!(
            "bus {bus:?}: consumer {name:?} on stream {:?} for {:?}",
            self.name, config.filter_subject
        );
        let stream = self
            .js
            .get_stream_no_info(&self.name)
            .await
            .map_err(|e| js_err(what.clone(), e))?;
        let mut consumer: jetstream::consumer::PullConsumer = stream
            .get_or_create_consumer(&name, config.clone())
            .await
            .map_err(|e| js_err(what.clone(), e))?;
        let info = consumer.info().await.map_err(|e| js_err(what.clone(), e))?;
        if info.config.filter_subject != config.filter_subject {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "{what}: it exists with filter {:?} (one durable consumer reads one pattern; a `durable` name without {{hash}} serves one pattern per group)",
                    info.config.filter_subject
                ),
            ));
        }
        if info.config.ack_wait != config.ack_wait {
            let mut updated = info.config.clone();
            updated.ack_wait = config.ack_wait;
            stream
                .create_consumer(updated)
                .await
                .map_err(|e| js_err(format!("{what}: updating its ack wait"), e))?;
        }
        Ok(consumer)
    }

    pub(crate) async fn subscribe(
        self: &Arc<Self>,
        inner: &Arc<Inner>,
        pattern: Pattern,
        options: SubscribeOptions,
        via: Arc<dyn Bus>,
    ) -> Result<Subscription> {
        self.ensure_pattern(&inner.name, &pattern)
            .await
            .map_err(|e| inner.failed(e))?;
        let (name, durable) = match &options.group {
            Some(group) => (
                durable_name(&self.durable, &inner.name, group, &pattern),
                true,
            ),
            None => (format!("busway-{}", &new_message_id()[..16]), false),
        };
        let config = self.consumer_config(&name, durable, &pattern, &options);
        let consumer = self
            .consumer(&inner.name, &config)
            .await
            .map_err(|e| inner.failed(e))?;
        if !durable {
            self.ephemeral.lock().insert(name.clone());
        }
        let (capacity, overflow) = options.queue(inner.queue);
        let topics = SubjectTopics::new(&pattern);
        let (tx, sub) = Subscription::channel(pattern, capacity, overflow, inner.counters.clone());
        let key: Arc<str> = format!("{}/{name}", self.name).into();
        // Only a `block` queue tells exactly which deliveries a handler took (see `returns`).
        let line = (overflow == Overflow::Block)
            .then(|| Arc::new(Line::new(key.clone(), inner.client.clone(), tx.clone())));
        if let Some(line) = &line {
            let mut lines = self.lines.lock();
            lines.retain(|l| l.strong_count() > 0);
            lines.push(Arc::downgrade(line));
        }
        let (pull_bytes, queue_bytes) =
            pull_bytes(inner.options.max_pending_bytes(), inner.max_payload());
        let queued = (overflow == Overflow::Block).then(|| {
            (
                parking_lot::Mutex::new(Queued::new(tx.stats().clone())),
                queue_bytes,
            )
        });
        let pump = Pump {
            inner: inner.clone(),
            setup: self.clone(),
            tx: tx.clone(),
            via,
            config,
            durable,
            prefetch: inner.options.prefetch(capacity),
            consumer: key,
            line: line.clone(),
            pull_bytes,
            queued,
        };
        let task = tokio::spawn(pump.run(consumer, topics));
        let guard = inner.track(tx, task.abort_handle(), None);
        let cleanup = ConsumerCleanup {
            setup: Arc::downgrade(self),
            name: (!durable).then_some(name),
        };
        // Dropped in this order: the pump stops, then the line lets go of the queue.
        Ok(sub.with_guard((guard, cleanup, line.map(LineGuard))))
    }
}

/// Deletes a group-less subscription's consumer when the subscription drops.
#[derive(Debug)]
struct ConsumerCleanup {
    setup: Weak<StreamSetup>,
    name: Option<String>,
}

impl Drop for ConsumerCleanup {
    fn drop(&mut self) {
        let (Some(name), Some(setup)) = (self.name.take(), self.setup.upgrade()) else {
            return;
        };
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        handle.spawn(async move {
            if !setup.ephemeral.lock().remove(&name) {
                return; // close() already deleted it
            }
            if let Ok(stream) = setup.js.get_stream_no_info(&setup.name).await {
                let _ = stream.delete_consumer(&name).await;
            }
        });
    }
}

/// The durable consumer name of `group` reading `pattern` on bus `bus`: the `durable`
/// template with `{group}`, `{hash}` and `{bus}` replaced.
pub(crate) fn durable_name(template: &str, bus: &str, group: &str, pattern: &Pattern) -> String {
    let default = group_consumer_name(group, pattern);
    let (clean, hash) = default.rsplit_once('-').unwrap_or((&default, ""));
    template
        .replace("{group}", clean)
        .replace("{hash}", hash)
        .replace("{bus}", &clean_name(bus))
}

/// `name` with the characters NATS refuses in consumer names as `_`, at most 48 of them.
fn clean_name(name: &str) -> String {
    name.chars()
        .take(48)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A durable consumer name for `group` reading `pattern`: the group (characters NATS refuses
/// replaced by `_`) and a hash of the pattern, so one group may read several patterns.
pub(crate) fn group_consumer_name(group: &str, pattern: &Pattern) -> String {
    let clean = clean_name(group);
    // FNV-1a: stable across processes and releases, unlike std's hasher.
    let mut hash: u32 = 0x811c_9dc5;
    for b in pattern.as_str().bytes() {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    format!("{clean}-{hash:08x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_names_are_valid_consumer_names() {
        let p = Pattern::new("orders.>").unwrap();
        let n = group_consumer_name("billing.v2 east", &p);
        assert!(n.starts_with("billing_v2_east-"), "{n}");
        assert!(!n.contains(['.', ' ', '*', '>']));
        assert_ne!(
            n,
            group_consumer_name("billing.v2 east", &Pattern::new("orders.*").unwrap())
        );
        assert_eq!(n, group_consumer_name("billing.v2 east", &p));
        assert_eq!(
            durable_name("{group}-{hash}", "eng", "billing.v2 east", &p),
            n
        );
        assert_eq!(
            durable_name("{bus}_{group}", "eng.x", "portfolio", &p),
            "eng_x_portfolio"
        );
    }
}
