//! JetStream group consumers that stop and start again must not use up a message's
//! deliveries with messages they prefetched and never handed to a handler.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use busway::{Bus, Message, Mode, StartFrom, SubscribeOptions};
use busway_testkit::nats::NatsServer;
use common::{connect, pattern, topic};

/// One group consumer, restarted 7 times, each instance handling (and acking) one message
/// and then dropped; an eighth instance handles the rest. With `max_deliveries = 5`, every
/// one of the 20 messages must be handled, none dead-lettered.
#[tokio::test]
async fn group_consumer_restarted_seven_times_handles_every_message() {
    let Some(server) = NatsServer::start("js_group_restart") else {
        return;
    };
    let bus = connect(
        &server.url(),
        "eng",
        Mode::Stream,
        "subjects = [\"jobs.>\"]\nmax_deliveries = 5\ndead_letter = \"dead.jobs\"",
    )
    .await
    .unwrap();
    let opts = SubscribeOptions::new()
        .group("workers")
        .start(StartFrom::Beginning)
        .ack_timeout(Duration::from_secs(2));
    for i in 0..20 {
        bus.publish(Message::new(topic("jobs.run"), format!("job-{i}")))
            .await
            .unwrap();
    }
    let mut handled = Vec::new();
    let mut attempts = Vec::new();
    for _ in 0..7 {
        let mut sub = bus
            .subscribe(pattern("jobs.>"), opts.clone())
            .await
            .unwrap();
        // Before the fix the sixth instance found nothing left: the rest were terminated.
        if let Ok(Some(d)) = sub.recv_timeout(Duration::from_secs(5)).await {
            attempts.push(d.attempt());
            handled.push(String::from_utf8(d.message().payload.to_vec()).unwrap());
            d.ack().await.unwrap();
        }
        drop(sub);
    }
    let mut sub = bus.subscribe(pattern("jobs.>"), opts).await.unwrap();
    while handled.iter().collect::<HashSet<_>>().len() < 20 {
        match sub.recv_timeout(Duration::from_secs(10)).await {
            Ok(Some(d)) => {
                attempts.push(d.attempt());
                handled.push(String::from_utf8(d.message().payload.to_vec()).unwrap());
                d.ack().await.unwrap();
            }
            _ => break,
        }
    }
    let stats = bus.stats();
    let distinct: HashSet<&String> = handled.iter().collect();
    println!(
        "RESULT js_group_restart published=20 handled={} distinct={} dropped={} dead_lettered={} max_attempt={}",
        handled.len(),
        distinct.len(),
        stats.dropped,
        stats.dead_lettered,
        attempts.iter().max().copied().unwrap_or(0)
    );
    assert_eq!(distinct.len(), 20, "handled: {handled:?}");
    assert_eq!(stats.dropped, 0, "nothing terminated");
    assert_eq!(stats.dead_lettered, 0, "nothing given up");
    // A message the server was sending to a subscription as it went (after its queue was
    // given back) comes back after the ack timeout, counted as an attempt.
    assert!(
        attempts.iter().all(|&a| a <= 2),
        "a handler saw each message once: {attempts:?}"
    );
}

/// Watermill's "ContinueAfterSubscribeClose": 1,000 messages read by a group whose consumer
/// is closed and replaced (a new bus, as a restarted process would) after a few messages
/// each time. Every message is acked; none is terminated.
#[tokio::test]
async fn continue_after_subscribe_close() {
    let Some(server) = NatsServer::start("js_continue_after_close") else {
        return;
    };
    const N: usize = 1000;
    let publisher = connect(
        &server.url(),
        "eng",
        Mode::Stream,
        "subjects = [\"jobs.>\"]",
    )
    .await
    .unwrap();
    for i in 0..N {
        publisher
            .publish(Message::new(topic("jobs.run"), format!("{i}")))
            .await
            .unwrap();
    }
    let opts = SubscribeOptions::new()
        .group("workers")
        .start(StartFrom::Beginning)
        .ack_timeout(Duration::from_secs(2));
    let mut acked = HashSet::new();
    let mut dropped = 0;
    let mut rounds = 0;
    let mut duplicates = 0;
    // Bounded: when a close loses what the server was sending to its pull, rounds wait for
    // ack timeouts (~120 s for the whole run); draining the pull takes ~20 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while acked.len() < N && rounds < 400 && std::time::Instant::now() < deadline {
        rounds += 1;
        let bus = connect(
            &server.url(),
            "eng",
            Mode::Stream,
            "subjects = [\"jobs.>\"]",
        )
        .await
        .unwrap();
        let mut sub = bus
            .subscribe(pattern("jobs.>"), opts.clone())
            .await
            .unwrap();
        // 1 to 40 messages per consumer, varying.
        let take = 1 + (rounds * 7) % 40;
        for _ in 0..take {
            match sub.recv_timeout(Duration::from_secs(2)).await {
                Ok(Some(d)) => {
                    let id = String::from_utf8(d.message().payload.to_vec()).unwrap();
                    d.ack().await.unwrap();
                    if !acked.insert(id) {
                        duplicates += 1;
                    }
                }
                _ => break,
            }
        }
        // Closed mid-stream: the bus first, then the subscription (a process shutting down).
        bus.close().await.unwrap();
        dropped += bus.stats().dropped;
        drop(sub);
    }
    println!(
        "RESULT js_continue_after_close published={N} acked={} rounds={rounds} dropped={dropped} duplicates={duplicates}",
        acked.len()
    );
    assert_eq!(acked.len(), N, "every message acked");
    assert_eq!(dropped, 0, "none terminated");
}
