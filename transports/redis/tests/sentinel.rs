//! A bus on a Sentinel-managed primary (`redis+sentinel://`), against a real Sentinel set
//! started per test (primary, replica, 3 sentinels; testkit `redis_sentinel`): the primary
//! killed -9 under load, in broadcast mode and in stream mode with and without
//! `min_replicas`. Each prints `RESULT ...` lines copied into RELIABILITY.md.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use busway::{Bus, ErrorKind, Health, Message, Mode, Overflow, SubscribeOptions, Subscription};
use busway_redis::{RedisBus, RedisConfig};
use busway_testkit::faults::{poll_blocking, within, LoadReport};
use busway_testkit::redis_sentinel::{SentinelSet, DOWN_AFTER, MASTER};

use common::{assert_refused, connect, pat, topic, WAIT};

const SECRET: &str = "s3cret-sentinel";

/// Messages of a run, published by `PUBLISHERS` tasks at a steady rate.
const TOTAL: usize = 10_000;
const PUBLISHERS: usize = 10;
/// Pause between two publishes of one publisher: 10 x 100/s = ~1,000 messages/s, so a
/// run lasts ~10 s and the failover (down-after 1 s + election) lands inside it.
const PACE: Duration = Duration::from_millis(10);
/// The fraction of the run after which the primary is killed.
const KILL_AT: f64 = 0.3;

async fn bus(url: &str, mode: Mode, f: impl FnOnce(&mut RedisConfig)) -> Arc<RedisBus> {
    Arc::new(connect("ha", url, mode, f).await)
}

/// What a failover run measured.
struct Failover {
    report: LoadReport,
    /// Kill -> the sentinels name a new primary that says it is one.
    sentinel_ms: u128,
    /// Kill -> the first delivery of a message whose publish started after the kill.
    resumed_ms: Option<u128>,
    /// Publishes started after the new primary was named that returned Ok.
    ok_after_failover: usize,
}

#[derive(Default)]
struct Seen {
    /// Payload -> (deliveries, first arrival).
    counts: HashMap<String, (u32, Instant)>,
}

/// Reads `sub` into payload -> deliveries, acking stream deliveries.
fn collect(mut sub: Subscription) -> (Arc<Mutex<Seen>>, tokio::task::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let out = seen.clone();
    let task = tokio::spawn(async move {
        while let Some(d) = sub.recv().await {
            let id = String::from_utf8_lossy(&d.message().payload).into_owned();
            let now = Instant::now();
            out.lock().unwrap().counts.entry(id).or_insert((0, now)).0 += 1;
            if d.is_ackable() {
                // An ack lost in the failover only means a redelivery (a duplicate).
                let _ = d.ack().await;
            }
        }
    });
    (seen, task)
}

/// Publishes `TOTAL` messages on `load.orders` at a steady rate while the primary is killed
/// -9 at `KILL_AT` of the run; once the sentinels named a new primary the old one is
/// restarted (it rejoins as a replica, so `min_replicas = 1` can be met again). At least
/// once (`stream`): waits until every Ok'd publish was delivered (60 s at most). At most
/// once: publishes probes until one arrives, then counts what never came.
async fn failover_under_load(
    label: &str,
    bus: Arc<RedisBus>,
    sub: Subscription,
    set: SentinelSet,
    stream: bool,
) -> (Failover, SentinelSet) {
    let t = topic("load.orders");
    let (seen, collector) = collect(sub);
    let attempted = Arc::new(AtomicUsize::new(0));
    // Milliseconds after `origin` of the kill and of the new primary's naming (0: not yet).
    let origin = Instant::now();
    let killed_at = Arc::new(AtomicU64::new(0));
    let failed_over_at = Arc::new(AtomicU64::new(0));

    let controller = {
        let attempted = attempted.clone();
        let (killed_at, failed_over_at) = (killed_at.clone(), failed_over_at.clone());
        let mut set = set;
        tokio::task::spawn_blocking(move || {
            let at = (TOTAL as f64 * KILL_AT) as usize;
            poll_blocking(Duration::from_secs(60), || attempted.load(Relaxed) >= at)
                .expect("publishing stalled before the kill");
            let old = set.primary().expect("a primary before the kill");
            set.node(old).kill();
            let kill = origin.elapsed();
            killed_at.store(kill.as_millis().max(1) as u64, Relaxed);
            let took = set
                .wait_failover(old, Duration::from_secs(30))
                .unwrap_or_else(|e| panic!("{e}\n{}", set.logs()));
            failed_over_at.store((kill + took).as_millis() as u64, Relaxed);
            set.node(old).restart();
            set.wait_ready(Duration::from_secs(30))
                .unwrap_or_else(|e| panic!("the old primary did not rejoin: {e}\n{}", set.logs()));
            (set, took)
        })
    };

    let mut tasks = Vec::new();
    for p in 0..PUBLISHERS {
        let (bus, t, attempted) = (bus.clone(), t.clone(), attempted.clone());
        tasks.push(tokio::spawn(async move {
            let mut ok = Vec::new();
            let mut failed = Vec::new();
            tokio::time::sleep(PACE * p as u32 / PUBLISHERS as u32).await;
            for i in 0..TOTAL / PUBLISHERS {
                let id = format!("p{p:02}-{i:04}");
                attempted.fetch_add(1, Relaxed);
                let started = origin.elapsed().as_millis() as u64;
                match bus.publish(Message::new(t.clone(), id.clone())).await {
                    Ok(()) => ok.push((id, started)),
                    Err(e) => failed.push(e),
                }
                tokio::time::sleep(PACE).await;
            }
            (ok, failed)
        }));
    }
    let started = Instant::now();
    let mut ok: Vec<(String, u64)> = Vec::new();
    let mut failures: Vec<busway::Error> = Vec::new();
    for task in tasks {
        let (o, f) = task.await.expect("publisher");
        ok.extend(o);
        failures.extend(f);
    }
    let publish_ms = started.elapsed().as_millis();
    let (set, took) = controller.await.expect("controller");

    if stream {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            let all = {
                let s = seen.lock().unwrap();
                ok.iter().all(|(id, _)| s.counts.contains_key(id))
            };
            if all {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    } else {
        // Everything published before a probe on the one command connection has arrived
        // (or is lost) once the probe arrived.
        let start = Instant::now();
        for n in 0.. {
            let probe = format!("probe-{n}");
            let _ = bus.publish(Message::new(t.clone(), probe.clone())).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            if seen.lock().unwrap().counts.contains_key(&probe) {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{label}: delivery did not resume after the failover: {}",
                bus.stats()
            );
        }
    }
    collector.abort();

    let kill_ms = killed_at.load(Relaxed);
    let failover_ms = failed_over_at.load(Relaxed);
    let s = seen.lock().unwrap();
    let mut report = LoadReport {
        transport: label.to_string(),
        attempted: attempted.load(Relaxed),
        ok_publishes: ok.len(),
        publish_ms,
        ..LoadReport::default()
    };
    for e in &failures {
        *report
            .failures
            .entry(e.kind().as_str().to_string())
            .or_default() += 1;
        report
            .failure_examples
            .entry(e.kind().as_str().to_string())
            .or_insert_with(|| e.to_string());
    }
    let mut resumed: Option<Instant> = None;
    let mut ok_after_failover = 0;
    for (id, started) in &ok {
        if *started > failover_ms {
            ok_after_failover += 1;
        }
        match s.counts.get(id) {
            Some((n, arrived)) => {
                report.delivered += 1;
                report.duplicates += (n - 1) as usize;
                if *started >= kill_ms {
                    resumed = Some(resumed.map_or(*arrived, |r| r.min(*arrived)));
                }
            }
            None => {
                report.lost += 1;
                if report.lost_examples.len() < 10 {
                    report.lost_examples.push(id.clone());
                }
            }
        }
    }
    let ok_ids: std::collections::HashSet<&str> = ok.iter().map(|(id, _)| id.as_str()).collect();
    for (id, (n, _)) in &s.counts {
        if !id.starts_with("probe-") && !ok_ids.contains(id.as_str()) {
            report.delivered_not_ok += 1;
            report.duplicates += (n - 1) as usize;
        }
    }
    let kill_instant = origin + Duration::from_millis(kill_ms);
    let resumed_ms = resumed.map(|r| r.saturating_duration_since(kill_instant).as_millis());
    report.reconnect_ms = resumed_ms.into_iter().collect();
    report.print();
    println!(
        "RESULT {label} failover: sentinel_failover_ms={} delivery_resumed_ms={} (after the kill; down-after-milliseconds={}) ok_after_failover={ok_after_failover} {}",
        took.as_millis(),
        resumed_ms.map_or("never".to_string(), |ms| ms.to_string()),
        DOWN_AFTER.as_millis(),
        bus.stats()
    );
    // No silent loss: every publish that failed is in the bus's error counter.
    assert!(
        bus.stats().errors >= failures.len() as u64,
        "{} failed publishes, errors counter {}",
        failures.len(),
        bus.stats().errors
    );
    drop(s);
    (
        Failover {
            report,
            sentinel_ms: took.as_millis(),
            resumed_ms,
            ok_after_failover,
        },
        set,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_primary_killed_under_load_fails_over_and_counts_losses() {
    let Some(set) = SentinelSet::start("sentinel_broadcast_failover") else {
        return;
    };
    within("sentinel broadcast failover", async {
        let url = set.url();
        let bus = bus(&url, Mode::Broadcast, |_| {}).await;
        // Block + a queue larger than the run: nothing is dropped in the process, so every
        // loss counted happened at the broker / connections.
        let sub = bus
            .subscribe(
                pat("load.>"),
                SubscribeOptions::new()
                    .capacity(20_000)
                    .overflow(Overflow::Block),
            )
            .await
            .unwrap();
        let (run, _set) =
            failover_under_load("redis-sentinel-broadcast", bus.clone(), sub, set, false).await;
        let r = &run.report;
        assert!(r.delivered > 0, "{r}");
        assert!(
            run.resumed_ms.is_some(),
            "nothing published after the kill arrived: {r}"
        );
        assert!(run.ok_after_failover > 0, "{r}");
        assert!(r.lost < r.ok_publishes / 2, "{r}");
        assert_eq!(r.delivered + r.lost, r.ok_publishes, "{r}");
        assert!(run.sentinel_ms > 0);
        assert!(bus.stats().reconnects > 0, "{}", bus.stats());
    })
    .await;
}

async fn stream_failover(label: &str, min_replicas: u32) -> Option<Failover> {
    let set = SentinelSet::start(label)?;
    let url = set.url();
    let run = within("sentinel stream failover", async {
        let bus = bus(&url, Mode::Stream, |c| {
            c.min_replicas = min_replicas;
            c.min_replicas_timeout = Duration::from_secs(1);
        })
        .await;
        // A short ack timeout: entries read just before the kill (pending, answer lost) are
        // reclaimed and delivered again within seconds.
        let sub = bus
            .subscribe(
                pat("load.orders"),
                SubscribeOptions::new()
                    .group("ha")
                    .capacity(20_000)
                    .ack_timeout(Duration::from_secs(5)),
            )
            .await
            .unwrap();
        let (run, _set) = failover_under_load(label, bus.clone(), sub, set, true).await;
        run
    })
    .await;
    Some(run)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_with_min_replicas_1_keeps_every_ok_publish_across_a_failover() {
    let Some(run) = stream_failover("redis-sentinel-stream-min_replicas=1", 1).await else {
        return;
    };
    let r = &run.report;
    assert_eq!(
        r.lost, 0,
        "Ok'd publishes never consumed, e.g. {:?}: {r}",
        r.lost_examples
    );
    assert!(r.ok_publishes > 0, "{r}");
    // The new primary took publishes too, once the old one rejoined as its replica.
    assert!(run.ok_after_failover > 0, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_with_min_replicas_0_reports_what_a_failover_lost() {
    let Some(run) = stream_failover("redis-sentinel-stream-min_replicas=0", 0).await else {
        return;
    };
    // A figure, not a failure: asynchronous replication may lose what the primary
    // acknowledged and had not yet sent to the replica.
    println!(
        "RESULT redis-sentinel-stream-min_replicas=0 acknowledged_publishes_lost={} of {}",
        run.report.lost, run.report.ok_publishes
    );
    assert!(run.report.ok_publishes > 0, "{}", run.report);
    assert!(run.ok_after_failover > 0, "{}", run.report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_replicas_without_a_replica_fails_the_publish_naming_the_bus() {
    let Some(mut set) = SentinelSet::start("sentinel_min_replicas_unmet") else {
        return;
    };
    within("min_replicas unmet", async {
        let bus = bus(&set.url(), Mode::Stream, |c| {
            c.min_replicas = 1;
            c.min_replicas_timeout = Duration::from_millis(200);
        })
        .await;
        let t = topic("ha.orders");
        bus.publish(Message::new(t.clone(), "with a replica"))
            .await
            .expect("one replica holds it");
        let replica = 1 - set.primary().unwrap();
        set.node(replica).kill();
        // The primary notices the lost replica within its replication timeout; until then
        // WAIT may still count it, so poll.
        let start = Instant::now();
        let err = loop {
            match bus.publish(Message::new(t.clone(), "no replica")).await {
                Err(e) => break e,
                Ok(()) => {
                    assert!(
                        start.elapsed() < WAIT,
                        "WAIT kept counting a killed replica"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
        let text = err.to_string();
        assert!(text.contains("bus \"ha\""), "{text}");
        assert!(text.contains("0 of 1 replicas"), "{text}");
        assert!(text.contains("min_replicas = 1"), "{text}");
        assert_eq!(bus.stats().health, Health::Up);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_master_name_is_a_connection_error_naming_the_bus_and_master() {
    let Some(set) = SentinelSet::start("sentinel_wrong_master") else {
        return;
    };
    let url = set
        .url()
        .replace(
            "redis+sentinel://",
            &format!("redis+sentinel://app:{SECRET}@"),
        )
        .replace(&format!("/{MASTER}"), "/nosuchmaster");
    let mut config = RedisConfig::new("ha", &url);
    config.connect_timeout = Duration::from_secs(1);
    let err = RedisBus::connect(config.clone())
        .await
        .expect_err("no such master");
    let text = format!("{err} {err:?} {config:?}");
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    assert!(err.to_string().contains("bus \"ha\""), "{err}");
    assert!(err.to_string().contains("nosuchmaster"), "{err}");
    assert!(!text.contains(SECRET), "{text}");
}

#[tokio::test]
async fn sentinel_urls_are_checked_without_connecting_and_never_print_the_password() {
    for (url, want) in [
        (
            "redis+sentinel://u:pw@127.0.0.1:1,127.0.0.1:2",
            "buses.main.url: \"redis+sentinel://u:***@127.0.0.1:1,127.0.0.1:2\": names no master",
        ),
        (
            "redis+sentinel://u:pw@127.0.0.1:x/m",
            "buses.main.url: \"redis+sentinel://u:***@127.0.0.1:x/m\": sentinel \"127.0.0.1:x\": the port must be",
        ),
        (
            "redis+sentinel://u:pw@h1/m?db=x",
            "buses.main.url: \"redis+sentinel://u:***@h1/m?db=x\": db must be",
        ),
    ] {
        assert_refused(&format!("url = {url:?}"), &format!("cfg.toml: {want}")).await;
    }
    assert_refused(
        "url = \"redis+sentinel://h1/m\"\nmin_replicas = 1",
        "cfg.toml: buses.main.min_replicas: applies to stream mode only",
    )
    .await;
    assert_refused(
        "url = \"redis+sentinel://h1/m\"\nmode = \"stream\"\nmin_replicas = 1\nmin_replicas_timeout = \"5s\"",
        "cfg.toml: buses.main.min_replicas_timeout: must be less than publish_timeout",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_primary_is_failed_over_and_both_connections_follow() {
    let Some(mut set) = SentinelSet::start("sentinel_frozen_primary") else {
        return;
    };
    within("sentinel frozen primary", async {
        let bus = bus(&set.url(), Mode::Broadcast, |c| {
            c.publish_timeout = Duration::from_secs(2);
        })
        .await;
        let t = topic("ha.frozen");
        let mut sub = bus
            .subscribe(pat("ha.frozen"), SubscribeOptions::new())
            .await
            .unwrap();
        bus.publish(Message::new(t.clone(), "before")).await.unwrap();
        assert_eq!(&common::next(&mut sub).await.message().payload[..], b"before");
        let old = set.primary().unwrap();
        // SIGSTOP: the connections stay open and nothing answers; only the command
        // connection's ping times out, so the pub/sub connection must be told.
        set.node(old).pause();
        let frozen = Instant::now();
        let took = tokio::task::block_in_place(|| set.wait_failover(old, Duration::from_secs(30)))
            .unwrap_or_else(|e| panic!("{e}\n{}", set.logs()));
        let mut n = 0;
        let delivered = loop {
            let probe = format!("probe-{n}");
            n += 1;
            let _ = bus.publish(Message::new(t.clone(), probe.clone())).await;
            match sub.recv_timeout(Duration::from_millis(500)).await {
                Ok(Some(d)) if d.message().payload == probe.as_bytes() => break frozen.elapsed(),
                _ => assert!(
                    frozen.elapsed() < Duration::from_secs(40),
                    "delivery did not resume with the primary frozen: {}",
                    bus.stats()
                ),
            }
        };
        println!(
            "RESULT redis-sentinel-broadcast frozen primary: sentinel_failover_ms={} delivery_resumed_ms={} (publish_timeout 2 s) {}",
            took.as_millis(),
            delivered.as_millis(),
            bus.stats()
        );
        // Thawed, the old primary is demoted by the sentinels; the bus stays on the new one.
        set.node(old).resume();
        tokio::task::block_in_place(|| set.wait_ready(Duration::from_secs(30)))
            .unwrap_or_else(|e| panic!("the old primary did not rejoin: {e}\n{}", set.logs()));
        bus.publish(Message::new(t.clone(), "after")).await.unwrap();
        loop {
            let d = common::next(&mut sub).await;
            if &d.message().payload[..] == b"after" {
                break;
            }
        }
        assert_eq!(bus.stats().health, Health::Up);
    })
    .await;
}
