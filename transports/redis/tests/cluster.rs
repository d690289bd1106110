//! A broadcast bus on a Redis Cluster (`redis+cluster://`, sharded pub/sub), against a real
//! cluster started per test (3 primaries + 3 replicas; testkit `redis_cluster`): topics over
//! every shard, a shard's primary killed -9 under load, and what a cluster refuses.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use busway::{Bus, ErrorKind, Message, Mode, Overflow, SubscribeOptions, Subscription, Topic};
use busway_testkit::faults::{poll_blocking, within};
use busway_testkit::redis_cluster::{RedisCluster, NODE_TIMEOUT};

use common::{assert_refused, connect, pat, topic, WAIT};

/// 20 topics and the primary (node index) serving each one's slot.
fn topics(cluster: &RedisCluster) -> Vec<(Topic, usize)> {
    (0..20)
        .map(|i| {
            let t = topic(&format!("cluster.orders.t{i:02}"));
            let slot = cluster.slot(t.as_str()).expect("CLUSTER KEYSLOT");
            let primary = cluster
                .primary_for_slot(slot)
                .expect("a primary for the slot");
            (t, primary)
        })
        .collect()
}

/// Reads `sub` into payload -> (deliveries, first arrival).
fn collect(
    mut sub: Subscription,
    seen: Arc<Mutex<HashMap<String, (u32, Instant)>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(d) = sub.recv().await {
            let id = String::from_utf8_lossy(&d.message().payload).into_owned();
            let now = Instant::now();
            seen.lock().unwrap().entry(id).or_insert((0, now)).0 += 1;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_topics_over_every_shard_are_all_delivered() {
    let Some(cluster) = RedisCluster::start("cluster_twenty_topics") else {
        return;
    };
    within("cluster: 20 topics", async {
        let topics = topics(&cluster);
        let shards: BTreeSet<usize> = topics.iter().map(|(_, p)| *p).collect();
        assert_eq!(shards.len(), 3, "the 20 topics cover every shard: {topics:?}");
        let url = cluster.url();
        // A publisher bus and a subscriber bus (as two processes would).
        let publisher = connect("cl", &url, Mode::Broadcast, |_| {}).await;
        let subscriber = connect("cl", &url, Mode::Broadcast, |_| {}).await;
        let seen = Arc::new(Mutex::new(HashMap::new()));
        let mut tasks = Vec::new();
        for (t, _) in &topics {
            let sub = subscriber
                .subscribe(
                    pat(t.as_str()),
                    SubscribeOptions::new()
                        .capacity(10_000)
                        .overflow(Overflow::Block),
                )
                .await
                .unwrap();
            tasks.push(collect(sub, seen.clone()));
        }
        const PER_TOPIC: usize = 100;
        for i in 0..PER_TOPIC {
            for (t, _) in &topics {
                publisher
                    .publish(Message::new(t.clone(), format!("{}-{i}", t.as_str())))
                    .await
                    .unwrap();
            }
        }
        publisher.flush().await.unwrap();
        let want = PER_TOPIC * topics.len();
        let start = Instant::now();
        while seen.lock().unwrap().len() < want && start.elapsed() < WAIT {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let seen = seen.lock().unwrap();
        println!(
            "RESULT redis-cluster-broadcast topics={} shards={} published={want} delivered={} duplicates={}",
            topics.len(),
            shards.len(),
            seen.len(),
            seen.values().map(|(n, _)| n - 1).sum::<u32>()
        );
        assert_eq!(seen.len(), want, "every message delivered");
        assert!(seen.values().all(|(n, _)| *n == 1), "no duplicates");
        for task in tasks {
            task.abort();
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_primary_killed_under_load_fails_over_and_delivery_resumes() {
    let Some(cluster) = RedisCluster::start("cluster_primary_killed") else {
        return;
    };
    within("cluster: primary killed", async {
        let topics = topics(&cluster);
        let url = cluster.url();
        let publisher = Arc::new(connect("cl", &url, Mode::Broadcast, |_| {}).await);
        let subscriber = connect("cl", &url, Mode::Broadcast, |_| {}).await;
        let seen = Arc::new(Mutex::new(HashMap::new()));
        let mut tasks = Vec::new();
        for (t, _) in &topics {
            let sub = subscriber
                .subscribe(
                    pat(t.as_str()),
                    SubscribeOptions::new()
                        .capacity(20_000)
                        .overflow(Overflow::Block),
                )
                .await
                .unwrap();
            tasks.push(collect(sub, seen.clone()));
        }
        // The shard of the first topic loses its primary.
        let victim = topics[0].1;
        let slot = cluster.slot(topics[0].0.as_str()).unwrap();
        let victim_topics: BTreeSet<String> = topics
            .iter()
            .filter(|(_, p)| *p == victim)
            .map(|(t, _)| t.as_str().to_string())
            .collect();

        // 20 topics, one publisher task each, 100 messages/s per topic for ~8 s.
        const PER_TOPIC: usize = 800;
        let origin = Instant::now();
        let attempted = Arc::new(AtomicUsize::new(0));
        let mut publishers = Vec::new();
        for (t, _) in topics.clone() {
            let (bus, attempted) = (publisher.clone(), attempted.clone());
            publishers.push(tokio::spawn(async move {
                let mut ok = Vec::new();
                let mut failed = 0usize;
                for i in 0..PER_TOPIC {
                    let id = format!("{}-{i:04}", t.as_str());
                    attempted.fetch_add(1, Relaxed);
                    let started = origin.elapsed();
                    match bus.publish(Message::new(t.clone(), id.clone())).await {
                        Ok(()) => ok.push((id, started)),
                        Err(_) => failed += 1,
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                (ok, failed)
            }));
        }
        let controller = {
            let attempted = attempted.clone();
            let mut cluster = cluster;
            tokio::task::spawn_blocking(move || {
                let at = PER_TOPIC * 20 * 3 / 10;
                poll_blocking(Duration::from_secs(60), || attempted.load(Relaxed) >= at)
                    .expect("publishing stalled before the kill");
                cluster.node(victim).kill();
                let killed = origin.elapsed();
                let took = cluster
                    .wait_failover(victim, slot, Duration::from_secs(30))
                    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
                (cluster, killed, took)
            })
        };
        let mut ok: Vec<(String, Duration)> = Vec::new();
        let mut failed = 0;
        for p in publishers {
            let (o, f) = p.await.unwrap();
            ok.extend(o);
            failed += f;
        }
        let (_cluster, killed, took) = controller.await.unwrap();
        publisher.flush().await.ok();
        // Delivery has resumed on the killed shard once a probe published there arrives.
        let probe_topic = topics[0].0.clone();
        let probe_start = Instant::now();
        for n in 0.. {
            let probe = format!("probe-{n}");
            let _ = publisher
                .publish(Message::new(probe_topic.clone(), probe.clone()))
                .await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            if seen.lock().unwrap().contains_key(&probe) {
                break;
            }
            assert!(
                probe_start.elapsed() < Duration::from_secs(30),
                "delivery on the killed shard did not resume: {} / {}",
                publisher.stats(),
                subscriber.stats()
            );
        }
        let seen = seen.lock().unwrap();
        let mut lost_victim = 0;
        let mut lost_other = 0;
        let mut resumed: Option<Duration> = None;
        for (id, started) in &ok {
            let on_victim = victim_topics.iter().any(|t| id.starts_with(t.as_str()));
            match seen.get(id) {
                Some((_, arrived)) => {
                    if on_victim && *started > killed {
                        let at = arrived.saturating_duration_since(origin + killed);
                        resumed = Some(resumed.map_or(at, |r| r.min(at)));
                    }
                }
                None if on_victim => lost_victim += 1,
                None => lost_other += 1,
            }
        }
        println!(
            "RESULT redis-cluster-broadcast primary-killed: cluster_failover_ms={} (cluster-node-timeout={} ms) delivery_resumed_on_the_shard_ms={} ok={} failed={failed} lost_on_the_killed_shard={lost_victim} lost_elsewhere={lost_other} publisher: {} subscriber: {}",
            took.as_millis(),
            NODE_TIMEOUT.as_millis(),
            resumed.map_or("never".into(), |d| d.as_millis().to_string()),
            ok.len(),
            publisher.stats(),
            subscriber.stats()
        );
        assert!(resumed.is_some(), "nothing published on the killed shard after the kill arrived");
        // The other shards are not touched by the failover: their subscriptions stay.
        assert_eq!(lost_other, 0, "lost on shards that stayed up");
        for task in tasks {
            task.abort();
        }
    })
    .await;
}

#[tokio::test]
async fn wildcards_and_stream_mode_are_refused_on_a_cluster_naming_the_bus() {
    assert_refused(
        "url = \"redis+cluster://u:pw@127.0.0.1:7000,127.0.0.1:7001\"\nmode = \"stream\"",
        "cfg.toml: buses.main.mode: stream mode is not supported on a Redis Cluster",
    )
    .await;
    assert_refused(
        "url = \"redis+cluster://u:pw@127.0.0.1:x\"",
        "cfg.toml: buses.main.url: \"redis+cluster://u:***@127.0.0.1:x\": node \"127.0.0.1:x\": expected host:port",
    )
    .await;
    let Some(cluster) = RedisCluster::start("cluster_wildcards_refused") else {
        return;
    };
    let bus = connect("cl", &cluster.url(), Mode::Broadcast, |_| {}).await;
    assert!(!bus.capabilities().wildcards);
    let err = bus
        .subscribe(pat("cluster.>"), SubscribeOptions::new())
        .await
        .expect_err("a pattern cannot be sharded");
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    assert!(err.to_string().contains("bus \"cl\""), "{err}");
    assert!(err.to_string().contains("cluster.>"), "{err}");
    // Exact topics work, request/reply included (inboxes are exact channels).
    let mut sub = bus
        .subscribe(pat("cluster.one"), SubscribeOptions::new())
        .await
        .unwrap();
    bus.publish(Message::new(topic("cluster.one"), "hi"))
        .await
        .unwrap();
    let d = common::next(&mut sub).await;
    assert_eq!(&d.message().payload[..], b"hi");
}
