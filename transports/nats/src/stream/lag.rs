//! Consumer lag per group ([`StreamSetup::consumer_lag`]): the info of the bus stream's
//! durable consumers. Read at scrape time, never on the message path.

use std::collections::BTreeMap;
use std::time::Duration;

use busway::{GroupLag, Result};
use futures::StreamExt;

use super::{js_err, StreamSetup};

impl StreamSetup {
    /// Every group reading the bus's stream: `num_pending` (stored, matching the consumer's
    /// filter, not yet delivered) as the lag and `num_ack_pending` (delivered, not acked) as
    /// pending, summed over the group's consumers (one per pattern).
    ///
    /// A group's consumer is durable and named `<group>-<hash of pattern>`
    /// ([`group_consumer_name`](super::consumer::group_consumer_name)), so the group label is
    /// that name without its hash: the group as NATS accepts it (characters it refuses are
    /// `_`). A subscription's own consumer (it expires, `inactive_threshold` set) is no group
    /// and is left out; a durable consumer of another name counts as a group of its own.
    ///
    /// # Errors
    /// `Broker` naming the bus and stream when the consumers cannot be listed.
    pub(crate) async fn consumer_lag(&self, bus: &str) -> Result<Vec<GroupLag>> {
        let what = || {
            format!(
                "bus {bus:?}: listing the consumers of stream {:?}",
                self.name
            )
        };
        let stream = self
            .js
            .get_stream_no_info(&self.name)
            .await
            .map_err(|e| js_err(what(), e))?;
        let mut consumers = stream.consumers();
        let mut groups: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        while let Some(info) = consumers.next().await {
            let info = info.map_err(|e| js_err(what(), e))?;
            if info.config.inactive_threshold != Duration::ZERO {
                continue;
            }
            let sum = groups.entry(group_of(&info.name).to_string()).or_default();
            sum.0 = sum.0.saturating_add(info.num_pending);
            sum.1 = sum.1.saturating_add(info.num_ack_pending as u64);
        }
        Ok(groups
            .into_iter()
            .map(|(group, (lag, pending))| GroupLag::new(group, Some(lag), pending))
            .collect())
    }
}

/// The group of a consumer named `<group>-<8 hex digits>`; any other name is its own group.
fn group_of(consumer: &str) -> &str {
    match consumer.rsplit_once('-') {
        Some((group, hash))
            if !group.is_empty()
                && hash.len() == 8
                && hash.bytes().all(|b| b.is_ascii_hexdigit()) =>
        {
            group
        }
        _ => consumer,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use busway::Pattern;

    #[test]
    fn the_group_is_the_consumer_name_without_its_pattern_hash() {
        let pattern = Pattern::new("orders.>").unwrap();
        let name = super::super::consumer::group_consumer_name("risk-desk", &pattern);
        assert_eq!(group_of(&name), "risk-desk");
        assert_eq!(group_of("audit"), "audit");
        assert_eq!(group_of("-0123abcd"), "-0123abcd");
        assert_eq!(group_of("x-notahash"), "x-notahash");
    }
}
