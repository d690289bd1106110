//! busway on a 3-node NATS cluster with replicated JetStream (`busway_testkit::nats_cluster`):
//! failover of core subscriptions, a stream leader killed under load, a frozen node, a
//! whole-cluster restart and a rolling restart, each against real `nats-server` processes.
//!
//! Loads are bounded for a 2-core machine running three servers and the test: 10,000
//! messages from 4 publishers at a steady rate (core and the leader kill), fewer where a test
//! only needs traffic in flight (the frozen node, the restarts). Each test prints its figures
//! (`FAILOVER_MS=`, counts) for RELIABILITY.md.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use busway::{Bus, Message, Mode, StartFrom, SubscribeOptions};
use busway_nats::NatsBus;
use busway_testkit::nats_cluster::NatsCluster;
use common::{connect, pattern, topic};

const PUBLISHERS: usize = 4;

/// The cluster node (index) the bus's connection is on.
fn node_of(cluster: &NatsCluster, bus: &NatsBus) -> Option<usize> {
    cluster.index_of_port(bus.client().server_info().port)
}

/// What the publishers sent: per message id, when the publish started and whether it
/// returned `Ok`.
#[derive(Debug, Default)]
struct Sent {
    ok: HashMap<String, Instant>,
    failed: Vec<(String, String, Duration)>,
}

/// `PUBLISHERS` tasks, each publishing `per` messages on `subject.<p>` at one every `every`
/// (ids `<p>-<seq>`), each through its own bus (connection) `buses[p]`; stops early when
/// `stop` is set.
fn publish_steadily(
    buses: Vec<NatsBus>,
    subject: &'static str,
    per: usize,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> (Arc<Mutex<Sent>>, Vec<tokio::task::JoinHandle<()>>) {
    let sent = Arc::new(Mutex::new(Sent::default()));
    let tasks = buses
        .into_iter()
        .enumerate()
        .map(|(p, bus)| {
            let sent = sent.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                for seq in 0..per {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    tick.tick().await;
                    let id = format!("{p}-{seq}");
                    let at = Instant::now();
                    let m = Message::new(topic(&format!("{subject}.{p}")), id.clone()).with_id(&id);
                    // Bounded: a publish that hangs fails the test instead of the run.
                    match tokio::time::timeout(Duration::from_secs(30), bus.publish(m)).await {
                        Ok(Ok(())) => {
                            sent.lock().unwrap().ok.insert(id, at);
                        }
                        Ok(Err(e)) => {
                            sent.lock()
                                .unwrap()
                                .failed
                                .push((id, e.to_string(), at.elapsed()))
                        }
                        Err(_) => panic!("publish {id} hung for 30 s"),
                    }
                }
                let _ = bus.flush().await;
            })
        })
        .collect();
    (sent, tasks)
}

/// A delivery: its id, when it came, the node the subscriber was on then.
type Received = (String, Instant, Option<usize>);

/// (1) Core NATS: the node the subscriber is connected to is killed -9 under a steady load
/// from 4 publishers (10,000 messages); the subscriber's connection moves to another node
/// and delivery resumes within 2 s. Core NATS stores nothing, so what was published while
/// the subscriber had no interest anywhere is lost: the test counts it and checks that
/// every missing message was published inside the outage, nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_subscriber_fails_over_when_its_node_is_killed() {
    let Some(mut cluster) = NatsCluster::start("core_subscriber_fails_over") else {
        return;
    };
    let sub_bus = connect(
        &cluster.urls(),
        "md",
        Mode::Broadcast,
        "ping_interval = \"1s\"",
    )
    .await
    .unwrap();
    let k = node_of(&cluster, &sub_bus).expect("subscriber on a cluster node");
    // Publishers on the two other nodes, so the only outage is the subscriber's.
    let mut pubs = Vec::new();
    for p in 0..PUBLISHERS {
        let node = (k + 1 + p % 2) % 3;
        let url = cluster.node(node).url();
        pubs.push(connect(&url, "md", Mode::Broadcast, "").await.unwrap());
    }
    let mut sub = sub_bus
        .subscribe(pattern("px.>"), SubscribeOptions::new().capacity(65_536))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await; // interest reaches every node
    let received: Arc<Mutex<Vec<Received>>> = Arc::default();
    let rx = {
        let received = received.clone();
        let ports: Vec<u16> = cluster.nodes().iter().map(|n| n.port()).collect();
        let client = sub_bus.client().clone();
        tokio::spawn(async move {
            while let Ok(Some(d)) = sub.recv_timeout(Duration::from_secs(4)).await {
                let port = client.server_info().port;
                let node = ports.iter().position(|p| *p == port);
                let id = String::from_utf8_lossy(&d.message().payload).into_owned();
                received.lock().unwrap().push((id, Instant::now(), node));
            }
        })
    };
    let stop = Arc::new(AtomicBool::new(false));
    // 4 x 2,500 at 1 per 2 ms each: 2,000 messages/s for 5 s.
    let (sent, tasks) = publish_steadily(pubs, "px", 2_500, Duration::from_millis(2), stop.clone());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let killed_at = Instant::now();
    cluster.node(k).kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.node(k).restart();
    for t in tasks {
        t.await.unwrap();
    }
    rx.await.unwrap();
    cluster.wait_ready(Duration::from_secs(30)).unwrap();

    let sent = sent.lock().unwrap();
    let received = received.lock().unwrap();
    assert!(
        sent.failed.is_empty(),
        "{:?}",
        &sent.failed[..3.min(sent.failed.len())]
    );
    let first_after = received
        .iter()
        .find(|(_, at, node)| *at > killed_at && node.is_some_and(|n| n != k))
        .expect("a delivery via another node after the kill");
    let failover = first_after.1 - killed_at;
    println!("FAILOVER_MS={}", failover.as_millis());
    assert!(
        failover < Duration::from_secs(2),
        "failover took {failover:?}"
    );

    let got: HashSet<&str> = received.iter().map(|(id, ..)| id.as_str()).collect();
    assert_eq!(
        got.len(),
        received.len(),
        "core NATS delivered a message twice"
    );
    let missed: Vec<(&String, &Instant)> = sent
        .ok
        .iter()
        .filter(|(id, _)| !got.contains(id.as_str()))
        .collect();
    println!(
        "published {} received {} lost {} (outage {failover:?})",
        sent.ok.len(),
        received.len(),
        missed.len()
    );
    assert_eq!(sent.ok.len(), PUBLISHERS * 2_500);
    assert_eq!(missed.len(), sent.ok.len() - received.len());
    // Everything lost was published between shortly before the kill (in flight through the
    // killed node) and the subscriber's interest being back (`first_after`).
    let window = (
        killed_at - Duration::from_millis(500),
        first_after.1 + Duration::from_millis(500),
    );
    for (id, at) in &missed {
        assert!(
            **at >= window.0 && **at <= window.1,
            "{id} lost but published outside the outage ({:?} after the kill)",
            at.saturating_duration_since(killed_at)
        );
    }
}

/// The keys of a replicated stream bus for these tests; a key in `extra` replaces the
/// default one.
fn r3(extra: &str) -> String {
    let base = "subjects = [\"orders.>\"]\nreplicas = 3\nduplicate_window = \"2m\"\n\
                publish_timeout = \"2s\"\npublish_retries = 5\nretry_backoff = \"200ms\"\n\
                ping_interval = \"1s\"";
    let key = |line: &str| line.split('=').next().unwrap_or("").trim().to_string();
    let overridden: HashSet<String> = extra.lines().map(key).collect();
    let mut out: Vec<&str> = base
        .lines()
        .filter(|l| !overridden.contains(&key(l)))
        .collect();
    out.extend(extra.lines());
    out.join("\n")
}

/// Consumes `orders.>` in group `g` from the stream's beginning (acking each) until every id in `want` was seen or
/// `limit` passes: (ids seen, deliveries that repeated an id already seen).
async fn consume_all(
    bus: &NatsBus,
    want: &HashSet<String>,
    limit: Duration,
) -> (HashSet<String>, u64) {
    let mut sub = bus
        .subscribe(
            pattern("orders.>"),
            SubscribeOptions::new()
                .group("g")
                .start(StartFrom::Beginning)
                .ack_timeout(Duration::from_secs(5)),
        )
        .await
        .unwrap();
    let start = Instant::now();
    let mut seen = HashSet::new();
    let mut duplicates = 0;
    while start.elapsed() < limit && !want.iter().all(|id| seen.contains(id)) {
        match sub.recv_timeout(Duration::from_secs(2)).await {
            Ok(Some(d)) => {
                let id = d.message().headers.id.clone().unwrap_or_default();
                d.ack().await.unwrap();
                if !seen.insert(id) {
                    duplicates += 1;
                }
            }
            Ok(None) => break,
            Err(_) => {}
        }
    }
    // Anything stored twice would come now.
    while let Ok(Some(d)) = sub.recv_timeout(Duration::from_secs(2)).await {
        let id = d.message().headers.id.clone().unwrap_or_default();
        d.ack().await.unwrap();
        if !seen.insert(id) {
            duplicates += 1;
        }
    }
    (seen, duplicates)
}

async fn stream_buses(cluster: &NatsCluster, n: usize, extra: &str) -> Vec<NatsBus> {
    let mut buses = Vec::new();
    for _ in 0..n {
        buses.push(
            connect(&cluster.urls(), "orders", Mode::Stream, &r3(extra))
                .await
                .unwrap(),
        );
    }
    buses
}

/// (2) JetStream R3: the stream leader is killed -9 while 4 publishers send 10,000
/// messages; a new leader is elected and the old node comes back. Every publish that
/// returned `Ok` is consumed (and acked) by the group, none is lost, and the stream stores
/// each message once (retries carry the same `Nats-Msg-Id`): `state.messages` equals the
/// distinct ids consumed. Deliveries of an id already seen (an ack lost in the failover)
/// are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_leader_killed_under_load_loses_and_duplicates_nothing() {
    let Some(mut cluster) = NatsCluster::start("jetstream_leader_killed") else {
        return;
    };
    let pubs = stream_buses(&cluster, PUBLISHERS, "").await;
    let stream = "BUSWAY_ORDERS";
    let leader = cluster
        .wait_stream_leader(stream, None, Duration::from_secs(10))
        .expect("a stream leader");
    let stop = Arc::new(AtomicBool::new(false));
    let counters: Vec<NatsBus> = pubs.clone();
    // 4 x 2,500 at 1 per 2 ms each (slower while the leader changes: each publisher waits
    // for its PubAck).
    let (sent, tasks) = publish_steadily(
        pubs,
        "orders",
        2_500,
        Duration::from_millis(2),
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let killed_at = Instant::now();
    cluster.node(leader).kill();
    let next = tokio::task::block_in_place(|| {
        cluster.wait_stream_leader(stream, Some(leader), Duration::from_secs(45))
    })
    .expect("a new stream leader");
    let election = killed_at.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    tokio::task::block_in_place(|| {
        cluster.node(leader).restart();
        cluster.wait_ready(Duration::from_secs(30)).unwrap();
    });
    for t in tasks {
        t.await.unwrap();
    }
    let retries: u64 = counters.iter().map(NatsBus::publish_retries).sum();
    let (ok, failed) = {
        let s = sent.lock().unwrap();
        (
            s.ok.keys().cloned().collect::<HashSet<String>>(),
            s.failed.clone(),
        )
    };
    let consumer = connect(&cluster.urls(), "orders", Mode::Stream, &r3(""))
        .await
        .unwrap();
    let (seen, duplicates) = consume_all(&consumer, &ok, Duration::from_secs(40)).await;
    let stored = tokio::task::block_in_place(|| cluster.stream_messages(stream)).unwrap();
    println!(
        "leader n{leader} killed; new leader n{next} after {election:?}; ok {} failed {} retries {retries} stored {stored} consumed {} duplicate deliveries {duplicates}",
        ok.len(),
        failed.len(),
        seen.len()
    );
    let lost: Vec<&String> = ok.iter().filter(|id| !seen.contains(*id)).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged publishes lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    assert_eq!(
        stored,
        seen.len() as u64,
        "the stream stores a message twice"
    );
    // A publish that failed after its retries may still have been stored (its ack was
    // lost): stored is Ok'd publishes plus those.
    let failed_but_stored = failed.iter().filter(|(id, ..)| seen.contains(id)).count();
    assert_eq!(stored, (ok.len() + failed_but_stored) as u64);
    assert_eq!(ok.len() + failed.len(), PUBLISHERS * 2_500);
}

/// (3) The node a stream publisher is connected to is frozen (SIGSTOP) under load. With no
/// retries, each publish waiting on it fails within `publish_timeout` (plus scheduling
/// slack) with an error naming the bus; once two PINGs go unanswered (`ping_interval` 1 s)
/// the client moves to another node and publishes succeed there. Nothing hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_node_times_out_publishes_then_they_go_through_another_node() {
    let Some(mut cluster) = NatsCluster::start("frozen_node") else {
        return;
    };
    let bus = connect(
        &cluster.urls(),
        "orders",
        Mode::Stream,
        &r3("publish_timeout = \"1s\"\npublish_retries = 0"),
    )
    .await
    .unwrap();
    bus.publish(Message::new(topic("orders.x"), "warm"))
        .await
        .unwrap();
    let k = node_of(&cluster, &bus).unwrap();
    cluster.node(k).pause();
    let frozen_at = Instant::now();
    let mut failures = Vec::new();
    let mut first_ok_after = None;
    for i in 0..200 {
        let m = Message::new(topic("orders.x"), format!("m{i}"));
        let start = Instant::now();
        let res = tokio::time::timeout(Duration::from_secs(10), bus.publish(m))
            .await
            .expect("a publish to a frozen node hung");
        match res {
            Ok(()) => {
                first_ok_after = Some(frozen_at.elapsed());
                break;
            }
            Err(e) => failures.push((e.to_string(), start.elapsed())),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.node(k).resume();
    let recovered = first_ok_after.expect("a publish succeeded through another node");
    println!(
        "frozen n{k}: {} publishes failed, first success after {recovered:?}",
        failures.len()
    );
    assert!(!failures.is_empty(), "no publish noticed the frozen node");
    for (e, took) in &failures {
        assert!(e.contains("bus \"orders\""), "{e}");
        assert!(
            *took < Duration::from_millis(1800),
            "a publish took {took:?}: {e}"
        );
    }
    assert_ne!(node_of(&cluster, &bus), Some(k), "still on the frozen node");
    assert!(recovered < Duration::from_secs(10), "{recovered:?}");
}

/// (4) The whole cluster is killed -9 and started again (file storage): the stream, its
/// messages and the group's acked position survive; the group continues after what it
/// acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_cluster_restart_keeps_the_stream_and_the_group_position() {
    let Some(mut cluster) = NatsCluster::start("whole_cluster_restart") else {
        return;
    };
    let bus = connect(
        &cluster.urls(),
        "orders",
        Mode::Stream,
        &r3("storage = \"file\""),
    )
    .await
    .unwrap();
    for i in 0..1000 {
        bus.publish(Message::new(topic("orders.x"), format!("{i}")).with_id(format!("{i}")))
            .await
            .unwrap();
    }
    {
        let mut sub = bus
            .subscribe(
                pattern("orders.>"),
                SubscribeOptions::new()
                    .group("g")
                    .start(StartFrom::Beginning),
            )
            .await
            .unwrap();
        for i in 0..500 {
            let d = sub
                .recv_timeout(Duration::from_secs(10))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                d.message().headers.id.as_deref(),
                Some(format!("{i}").as_str())
            );
            d.ack().await.unwrap();
        }
    }
    bus.flush().await.unwrap();
    bus.close().await.unwrap();
    // Acks are replicated asynchronously with the consumer's state.
    tokio::time::sleep(Duration::from_secs(1)).await;
    tokio::task::block_in_place(|| cluster.restart_all()).unwrap();
    let stored = tokio::task::block_in_place(|| {
        let start = Instant::now();
        loop {
            match cluster.stream_messages("BUSWAY_ORDERS") {
                Some(n) => return n,
                None if start.elapsed() < Duration::from_secs(20) => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                None => panic!("no stream info after the restart"),
            }
        }
    });
    assert_eq!(stored, 1000);
    let bus = connect(&cluster.urls(), "orders", Mode::Stream, &r3(""))
        .await
        .unwrap();
    let want: HashSet<String> = (500..1000).map(|i| i.to_string()).collect();
    let (seen, duplicates) = consume_all(&bus, &want, Duration::from_secs(30)).await;
    let before: Vec<&String> = seen.iter().filter(|id| !want.contains(*id)).collect();
    println!(
        "after the restart: consumed {} (acked before: {}), duplicates {duplicates}",
        seen.len(),
        before.len()
    );
    assert!(
        want.iter().all(|id| seen.contains(id)),
        "missing after the restart"
    );
    assert!(
        before.is_empty(),
        "acked before the restart, delivered again: {before:?}"
    );
}

/// (5) Rolling restart: each node in turn is killed -9 and started again (waiting for the
/// cluster to re-form) while 4 publishers send; no acknowledged message is lost and none is
/// stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_under_load_loses_no_acked_message() {
    let Some(mut cluster) = NatsCluster::start("rolling_restart") else {
        return;
    };
    let pubs = stream_buses(&cluster, PUBLISHERS, "").await;
    let stop = Arc::new(AtomicBool::new(false));
    // At most 4 x 2,500 at 1 per 5 ms each; stopped once the third node is back.
    let (sent, tasks) = publish_steadily(
        pubs,
        "orders",
        2_500,
        Duration::from_millis(5),
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    for i in 0..3 {
        tokio::task::block_in_place(|| {
            cluster.node(i).kill();
            std::thread::sleep(Duration::from_millis(500));
            cluster.node(i).restart();
            cluster.wait_ready(Duration::from_secs(30)).unwrap();
            // The stream has its 3 replicas again before the next node goes.
            cluster
                .wait_stream_leader("BUSWAY_ORDERS", None, Duration::from_secs(20))
                .expect("a stream leader");
            std::thread::sleep(Duration::from_secs(1));
        });
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let (ok, failed) = {
        let s = sent.lock().unwrap();
        (
            s.ok.keys().cloned().collect::<HashSet<String>>(),
            s.failed.clone(),
        )
    };
    let consumer = connect(&cluster.urls(), "orders", Mode::Stream, &r3(""))
        .await
        .unwrap();
    let (seen, duplicates) = consume_all(&consumer, &ok, Duration::from_secs(40)).await;
    let stored = tokio::task::block_in_place(|| cluster.stream_messages("BUSWAY_ORDERS")).unwrap();
    println!(
        "rolling restart: ok {} failed {} stored {stored} consumed {} duplicate deliveries {duplicates}",
        ok.len(),
        failed.len(),
        seen.len()
    );
    let lost = ok.iter().filter(|id| !seen.contains(*id)).count();
    assert_eq!(lost, 0, "acknowledged publishes lost");
    assert_eq!(
        stored,
        seen.len() as u64,
        "the stream stores a message twice"
    );
}
