//! Memory held for subscriptions stays bounded by configuration whatever a remote peer sends:
//! a subscriber that never reads, flooded by a raw async-nats client, does not grow the
//! process beyond `max_pending_bytes` and some slack.
//!
//! Its own test binary (and nextest runs each test in its own process), so the RSS measured
//! is this flood's alone.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use busway::{Bus, Mode, Overflow, StartFrom, SubscribeOptions};
use busway_testkit::nats::NatsServer;
use common::{connect, pattern};

/// The bound under test, per subscription.
const MAX_PENDING: u64 = 16 << 20;
/// Messages flooded, and their payload size: 200 MB in all, far past the bound.
const N: usize = 2000;
const SIZE: usize = 100 * 1024;
/// What the process may grow by beyond `MAX_PENDING`: the allocator's arenas, the flooding
/// client's buffers, the runtime. Unbounded, the core flood grew the process by ~200 MB.
const SLACK: u64 = 32 << 20;

/// The process's resident set, in bytes.
fn rss() -> u64 {
    busway_testkit::faults::rss_kib().expect("VmRSS in /proc/self/status") * 1024
}

fn extra(mode_keys: &str) -> String {
    format!("max_pending_bytes = {MAX_PENDING}\n{mode_keys}")
}

/// Waits until `f` holds or `within` passes.
async fn settle(within: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + within;
    while !f() && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn core_block_subscriber_that_never_reads_stays_bounded() {
    let Some(server) = NatsServer::start("mem_core_block") else {
        return;
    };
    let bus = connect(&server.url(), "md", Mode::Broadcast, &extra(""))
        .await
        .unwrap();
    let opts = SubscribeOptions::new()
        .capacity(1024)
        .overflow(Overflow::Block);
    let mut sub = bus.subscribe(pattern("flood.>"), opts).await.unwrap();
    let raw = async_nats::connect(server.url()).await.unwrap();
    let before = rss();
    let payload = bytes::Bytes::from(vec![b'x'; SIZE]);
    for _ in 0..N {
        raw.publish("flood.x", payload.clone()).await.unwrap();
    }
    raw.flush().await.unwrap();
    bus.flush().await.unwrap();
    settle(Duration::from_secs(10), || bus.stats().dropped > 0).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss();
    let growth = after.saturating_sub(before);
    let dropped = bus.stats().dropped;
    let mut got = 0u64;
    while let Ok(Some(_)) = sub.recv_timeout(Duration::from_millis(500)).await {
        got += 1;
    }
    bus.flush().await.unwrap();
    let dropped_after = bus.stats().dropped;
    println!(
        "RESULT mem_core_block before_kib={} after_kib={} growth_kib={} got={got} dropped={dropped_after}",
        before / 1024,
        after / 1024,
        growth / 1024
    );
    assert!(
        growth < MAX_PENDING + SLACK,
        "grew {} KiB (bound {} KiB)",
        growth / 1024,
        (MAX_PENDING + SLACK) / 1024
    );
    assert!(dropped > 0, "drops counted");
    assert_eq!(
        got + dropped_after,
        N as u64,
        "got {got}, dropped {dropped_after}"
    );
    assert_eq!(
        sub.stats().dropped,
        dropped_after,
        "the subscription's own drops"
    );
}

#[tokio::test]
async fn jetstream_group_block_subscriber_that_never_reads_stays_bounded_and_loses_nothing() {
    let Some(server) = NatsServer::start("mem_js_block") else {
        return;
    };
    let bus = connect(
        &server.url(),
        "eng",
        Mode::Stream,
        &extra("subjects = [\"flood.>\"]\nstorage = \"memory\""),
    )
    .await
    .unwrap();
    let opts = SubscribeOptions::new()
        .group("workers")
        .start(StartFrom::Beginning)
        .capacity(1024)
        .overflow(Overflow::Block)
        .ack_timeout(Duration::from_secs(300));
    let mut sub = bus.subscribe(pattern("flood.>"), opts).await.unwrap();
    let js = async_nats::jetstream::new(async_nats::connect(server.url()).await.unwrap());
    let before = rss();
    // Acks awaited 32 at a time: the flooding client holds each distinct payload until it is
    // written, and a whole flood of them in its own buffers would be measured too.
    let mut acks = Vec::with_capacity(32);
    for i in 0..N {
        // The message's number in its first 8 bytes.
        let mut payload = vec![b'x'; SIZE];
        payload[..8].copy_from_slice(format!("{i:08}").as_bytes());
        acks.push(js.publish("flood.x", payload.into()).await.unwrap());
        if acks.len() == 32 {
            for ack in acks.drain(..) {
                ack.await.unwrap();
            }
        }
    }
    for ack in acks {
        ack.await.unwrap();
    }
    // Long enough for an unbounded pull to have fetched everything.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = rss();
    let growth = after.saturating_sub(before);
    let mut seen = HashSet::new();
    while seen.len() < N {
        match sub.recv_timeout(Duration::from_secs(10)).await {
            Ok(Some(d)) => {
                seen.insert(d.message().payload.slice(..8));
                d.ack().await.unwrap();
            }
            _ => break,
        }
    }
    println!(
        "RESULT mem_js_block before_kib={} after_kib={} growth_kib={} delivered={} dropped={}",
        before / 1024,
        after / 1024,
        growth / 1024,
        seen.len(),
        bus.stats().dropped
    );
    assert!(
        growth < MAX_PENDING + SLACK,
        "grew {} KiB (bound {} KiB)",
        growth / 1024,
        (MAX_PENDING + SLACK) / 1024
    );
    assert_eq!(seen.len(), N, "every message delivered once read");
    assert_eq!(bus.stats().dropped, 0);
}
