//! Stream mode against a real redis-server started per test.

mod common;

use std::time::{Duration, Instant};

use busway::{Bus, Health, Message, Mode, StartFrom, SubscribeOptions, Subscription};
use busway_redis::{RedisBus, RedisConfig};
use busway_testkit::redis::RedisServer;

use common::{connect, next, pat, topic, WAIT};

/// A stream bus with short read blocks and rescans, so nack redelivery and wildcard
/// discovery are quick.
async fn bus(url: &str, f: impl FnOnce(&mut RedisConfig)) -> RedisBus {
    connect("engine", url, Mode::Stream, |c| {
        c.read_block = Duration::from_millis(200);
        c.rescan_interval = Duration::from_millis(200);
        f(c)
    })
    .await
}

async fn nothing(sub: &mut Subscription) {
    if let Ok(Some(d)) = sub.recv_timeout(Duration::from_millis(700)).await {
        panic!("unexpected delivery {d:?}");
    }
}

fn pending(server: &RedisServer, key: &str, group: &str) -> String {
    server
        .cli(&["XPENDING", key, group])
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

#[tokio::test]
async fn round_trip_headers_and_ack() {
    let Some(server) = RedisServer::start("stream_round_trip") else {
        return;
    };
    let bus = bus(&server.url(), |_| {}).await;
    assert!(bus.capabilities().ack);
    let mut sub = bus
        .subscribe(pat("orders.new"), SubscribeOptions::new().group("risk"))
        .await
        .unwrap();
    let m = Message::new(topic("orders.new"), &b"{\"qty\":1}"[..])
        .with_id("o1")
        .with_content_type("application/json")
        .with_header("desk", "eq")
        .stamped();
    bus.publish(m.clone()).await.unwrap();
    assert_eq!(
        server.cli(&["XLEN", "busway:stream:orders.new"]).trim(),
        "1"
    );
    assert_eq!(
        server
            .cli(&["SISMEMBER", "busway:topics", "orders.new"])
            .trim(),
        "1"
    );
    let d = next(&mut sub).await;
    assert_eq!(d.message(), &m);
    assert_eq!(d.attempt(), 1);
    assert_eq!(pending(&server, "busway:stream:orders.new", "risk"), "1");
    d.ack().await.unwrap();
    assert_eq!(pending(&server, "busway:stream:orders.new", "risk"), "0");
}

#[tokio::test]
async fn groups_compete_and_groupless_subscribers_each_get_all() {
    let Some(server) = RedisServer::start("stream_groups") else {
        return;
    };
    let bus = bus(&server.url(), |_| {}).await;
    let mut a = bus
        .subscribe(pat("jobs"), SubscribeOptions::new().group("w"))
        .await
        .unwrap();
    let mut b = bus
        .subscribe(pat("jobs"), SubscribeOptions::new().group("w"))
        .await
        .unwrap();
    let mut solo1 = bus
        .subscribe(pat("jobs"), SubscribeOptions::new())
        .await
        .unwrap();
    let mut solo2 = bus
        .subscribe(pat("jobs"), SubscribeOptions::new())
        .await
        .unwrap();
    for i in 0..20u8 {
        bus.publish(Message::new(topic("jobs"), vec![i]))
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    let deadline = Instant::now() + WAIT;
    while seen.len() < 20 && Instant::now() < deadline {
        tokio::select! {
            Some(d) = a.recv() => { d.ack().await.unwrap(); seen.push(d.message().payload[0]); }
            Some(d) = b.recv() => { d.ack().await.unwrap(); seen.push(d.message().payload[0]); }
        }
    }
    seen.sort();
    assert_eq!(
        seen,
        (0..20).collect::<Vec<u8>>(),
        "each job once across the group"
    );
    for s in [&mut solo1, &mut solo2] {
        for i in 0..20u8 {
            let d = next(s).await;
            assert_eq!(d.message().payload[0], i);
            d.ack().await.unwrap();
        }
    }
    nothing(&mut a).await;
}

#[tokio::test]
async fn nack_redelivers_and_max_deliveries_dead_letters() {
    let Some(server) = RedisServer::start("stream_nack") else {
        return;
    };
    let bus = bus(&server.url(), |c| {
        c.max_deliveries = Some(3);
        c.dead_letter = Some("dead.letters".into());
    })
    .await;
    let mut dead = bus
        .subscribe(pat("dead.letters"), SubscribeOptions::new().group("ops"))
        .await
        .unwrap();
    let mut sub = bus
        .subscribe(pat("pay.*"), SubscribeOptions::new().group("g"))
        .await
        .unwrap();
    bus.publish(Message::new(topic("pay.x"), &b"p"[..]))
        .await
        .unwrap();
    for attempt in 1..=3 {
        let d = next(&mut sub).await;
        assert_eq!(d.attempt(), attempt);
        assert_eq!(&d.message().payload[..], b"p");
        d.nack().await.unwrap();
    }
    let d = next(&mut dead).await;
    assert_eq!(&d.message().payload[..], b"p");
    assert_eq!(d.message().headers.get("dead_letter.topic"), Some("pay.x"));
    assert_eq!(d.message().headers.get("dead_letter.deliveries"), Some("3"));
    d.ack().await.unwrap();
    assert_eq!(bus.stats().dead_lettered, 1);
    assert!(bus.stats().redelivered >= 2);
    nothing(&mut sub).await;
    assert_eq!(pending(&server, "busway:stream:pay.x", "g"), "0");
}

#[tokio::test]
async fn entries_of_a_dead_consumer_are_reclaimed() {
    let Some(server) = RedisServer::start("stream_reclaim") else {
        return;
    };
    let bus = bus(&server.url(), |c| {
        c.claim_idle = Some(Duration::from_millis(300))
    })
    .await;
    let mut first = bus
        .subscribe(pat("work"), SubscribeOptions::new().group("g"))
        .await
        .unwrap();
    bus.publish(Message::new(topic("work"), &b"w"[..]))
        .await
        .unwrap();
    let d = next(&mut first).await;
    assert_eq!(d.attempt(), 1);
    drop(d); // never acked
    drop(first); // the consumer dies
    let mut second = bus
        .subscribe(pat("work"), SubscribeOptions::new().group("g"))
        .await
        .unwrap();
    let d = next(&mut second).await;
    assert_eq!(&d.message().payload[..], b"w");
    assert_eq!(d.attempt(), 2);
    d.ack().await.unwrap();
    assert_eq!(pending(&server, "busway:stream:work", "g"), "0");
}

#[tokio::test]
async fn wildcard_finds_keys_created_after_it_subscribed() {
    let Some(server) = RedisServer::start("stream_wildcard") else {
        return;
    };
    let bus = bus(&server.url(), |_| {}).await;
    bus.publish(Message::new(topic("md.old"), &b"before"[..]))
        .await
        .unwrap();
    let mut sub = bus
        .subscribe(pat("md.*"), SubscribeOptions::new())
        .await
        .unwrap();
    // Another process publishes on new topics.
    let other = bus_other(&server).await;
    other
        .publish(Message::new(topic("md.new1"), &b"n1"[..]))
        .await
        .unwrap();
    other
        .publish(Message::new(topic("md.deep.no"), &b"no"[..]))
        .await
        .unwrap();
    other
        .publish(Message::new(topic("md.old"), &b"after"[..]))
        .await
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        let d = next(&mut sub).await;
        got.push(String::from_utf8(d.message().payload.to_vec()).unwrap());
        d.ack().await.unwrap();
    }
    got.sort();
    assert_eq!(
        got,
        ["after", "n1"],
        "new key found; old entries not replayed"
    );
    nothing(&mut sub).await;
}

async fn bus_other(server: &RedisServer) -> RedisBus {
    bus(&server.url(), |_| {}).await
}

#[tokio::test]
async fn start_from_beginning_replays() {
    let Some(server) = RedisServer::start("stream_beginning") else {
        return;
    };
    let bus = bus(&server.url(), |_| {}).await;
    for i in 0..3u8 {
        bus.publish(Message::new(topic("log.a"), vec![i]))
            .await
            .unwrap();
    }
    let mut new = bus
        .subscribe(pat("log.>"), SubscribeOptions::new())
        .await
        .unwrap();
    let mut all = bus
        .subscribe(
            pat("log.>"),
            SubscribeOptions::new().start(StartFrom::Beginning),
        )
        .await
        .unwrap();
    for i in 0..3u8 {
        assert_eq!(next(&mut all).await.message().payload[0], i);
    }
    nothing(&mut new).await;
}

#[tokio::test]
async fn garbage_entries_are_counted_and_skipped() {
    let Some(server) = RedisServer::start("stream_garbage") else {
        return;
    };
    let bus = bus(&server.url(), |_| {}).await;
    let mut sub = bus
        .subscribe(pat("g"), SubscribeOptions::new().group("x"))
        .await
        .unwrap();
    server.cli(&["XADD", "busway:stream:g", "*", "nopayload", "1"]);
    bus.publish(Message::new(topic("g"), &b"ok"[..]))
        .await
        .unwrap();
    let d = next(&mut sub).await;
    assert_eq!(&d.message().payload[..], b"ok");
    assert_eq!(bus.stats().decode_errors, 1);
}

#[tokio::test]
async fn request_reply_on_a_stream_bus() {
    let Some(server) = RedisServer::start("stream_request") else {
        return;
    };
    let bus = bus(&server.url(), |_| {}).await;
    let mut svc = bus
        .subscribe(pat("svc.price"), SubscribeOptions::new().group("svc"))
        .await
        .unwrap();
    tokio::spawn(async move {
        while let Some(d) = svc.recv().await {
            d.reply(&b"42"[..]).await.unwrap();
            d.ack().await.unwrap();
        }
    });
    let r = bus
        .request(Message::new(topic("svc.price"), &b"?"[..]), WAIT)
        .await
        .unwrap();
    assert_eq!(&r.payload[..], b"42");
}

#[tokio::test]
async fn restart_with_aof_loses_nothing_unacked() {
    let Some(mut server) = RedisServer::start_with_aof("stream_restart_aof") else {
        return;
    };
    let bus = bus(&server.url(), |c| {
        c.claim_idle = Some(Duration::from_millis(500))
    })
    .await;
    let mut sub = bus
        .subscribe(pat("fills"), SubscribeOptions::new().group("book"))
        .await
        .unwrap();
    // 1..=3 are delivered but not acked before the kill; 4..=6 are published while the
    // subscriber is not reading.
    for i in 1..=3u8 {
        bus.publish(Message::new(topic("fills"), vec![i]))
            .await
            .unwrap();
    }
    let mut unacked = Vec::new();
    for _ in 0..3 {
        unacked.push(next(&mut sub).await);
    }
    for i in 4..=6u8 {
        bus.publish(Message::new(topic("fills"), vec![i]))
            .await
            .unwrap();
    }
    server.kill();
    drop(unacked); // the process "crashed" before acking
    server.restart();
    let start = Instant::now();
    while bus.stats().health != Health::Up {
        assert!(start.elapsed() < WAIT, "reconnect: {}", bus.stats());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bus.publish(Message::new(topic("fills"), vec![7]))
        .await
        .unwrap();
    let mut got = std::collections::BTreeSet::new();
    let deadline = Instant::now() + WAIT;
    while got.len() < 7 && Instant::now() < deadline {
        if let Ok(Some(d)) = sub.recv_timeout(Duration::from_millis(500)).await {
            d.ack().await.unwrap();
            got.insert(d.message().payload[0]);
        }
    }
    assert_eq!(
        got.into_iter().collect::<Vec<u8>>(),
        (1..=7).collect::<Vec<u8>>(),
        "{}",
        bus.stats()
    );
    assert!(bus.stats().reconnects >= 2);
}

#[tokio::test]
async fn groupless_subscriptions_read_on_from_their_last_id_after_a_restart() {
    let Some(mut server) = RedisServer::start_with_aof("stream_groupless_restart") else {
        return;
    };
    let bus = bus(&server.url(), |_| {}).await;
    let mut a = bus
        .subscribe(pat("ticks"), SubscribeOptions::new())
        .await
        .unwrap();
    let mut b = bus
        .subscribe(pat("*"), SubscribeOptions::new())
        .await
        .unwrap();
    for i in 1..=3u8 {
        bus.publish(Message::new(topic("ticks"), vec![i]))
            .await
            .unwrap();
    }
    for s in [&mut a, &mut b] {
        for i in 1..=3u8 {
            let d = next(s).await;
            assert_eq!(d.message().payload[0], i);
            d.ack().await.unwrap();
        }
    }
    server.kill();
    server.restart();
    // Published while the reader may still be reconnecting: it reads on after the last id
    // it had, so these arrive, once each, and nothing before them comes back.
    for i in 4..=6u8 {
        bus.publish(Message::new(topic("ticks"), vec![i]))
            .await
            .unwrap();
    }
    for s in [&mut a, &mut b] {
        for i in 4..=6u8 {
            let d = next(s).await;
            assert_eq!(d.message().payload[0], i, "{}", bus.stats());
            d.ack().await.unwrap();
        }
    }
    nothing(&mut a).await;
    nothing(&mut b).await;
    assert!(bus.stats().reconnects >= 2, "{}", bus.stats());
}

#[tokio::test]
async fn a_stalled_group_member_does_not_hold_up_its_group_mates() {
    let Some(server) = RedisServer::start("stream_stalled_member") else {
        return;
    };
    let bus = bus(&server.url(), |_| {}).await;
    // Never read: its queue of one fills with the first entry it is handed.
    let stalled = bus
        .subscribe(
            pat("work.q"),
            SubscribeOptions::new()
                .group("w")
                .capacity(1)
                .overflow(busway::Overflow::Block),
        )
        .await
        .unwrap();
    let mut busy = bus
        .subscribe(pat("work.q"), SubscribeOptions::new().group("w"))
        .await
        .unwrap();
    for i in 0..20u8 {
        bus.publish(Message::new(topic("work.q"), vec![i]))
            .await
            .unwrap();
    }
    let mut got = Vec::new();
    while got.len() + stalled.pending() < 20 {
        let d = next(&mut busy).await;
        got.push(d.message().payload[0]);
        d.ack().await.unwrap();
    }
    assert_eq!(stalled.pending(), 1, "the stalled member holds one");
    assert_eq!(got.len(), 19, "its group mate took the rest: {got:?}");
}

#[tokio::test]
async fn a_groupless_entry_deleted_before_its_redelivery_is_counted_not_delivered() {
    let Some(server) = RedisServer::start("stream_groupless_trimmed") else {
        return;
    };
    let bus = bus(&server.url(), |_| {}).await;
    let mut sub = bus
        .subscribe(pat("trim.t"), SubscribeOptions::new())
        .await
        .unwrap();
    bus.publish(Message::new(topic("trim.t"), &b"gone"[..]))
        .await
        .unwrap();
    bus.publish(Message::new(topic("trim.t"), &b"kept"[..]))
        .await
        .unwrap();
    let gone = next(&mut sub).await;
    let kept = next(&mut sub).await;
    // The stream loses the first entry (as trimming by stream_maxlen would) before its nack.
    let first = server.cli(&["XRANGE", "busway:stream:trim.t", "-", "+", "COUNT", "1"]);
    let id = first.lines().next().unwrap().trim().to_string();
    assert_eq!(
        server.cli(&["XDEL", "busway:stream:trim.t", &id]).trim(),
        "1"
    );
    let errors = bus.stats().errors;
    gone.nack().await.unwrap();
    kept.nack().await.unwrap();
    let d = next(&mut sub).await;
    assert_eq!(&d.message().payload[..], b"kept");
    assert_eq!(d.attempt(), 2);
    d.ack().await.unwrap();
    nothing(&mut sub).await;
    assert_eq!(bus.stats().errors, errors + 1, "{}", bus.stats());
}

/// This bus's connections in `CLIENT LIST` (every one is named `busway:<app>:<bus>`).
fn ours(server: &RedisServer) -> usize {
    server
        .cli(&["CLIENT", "LIST"])
        .lines()
        .filter(|l| l.contains("name=busway:test:engine "))
        .count()
}

/// Waits until the bus holds `n` connections (a reader closes its connection after its
/// last subscription goes, in the background).
async fn wait_connections(server: &RedisServer, bus: &RedisBus, n: usize) {
    let deadline = Instant::now() + WAIT;
    while ours(server) != n || bus.stats().connections != n as u64 {
        assert!(
            Instant::now() < deadline,
            "want {n} connections, have {} ({} counted):\n{}",
            ours(server),
            bus.stats().connections,
            server.cli(&["CLIENT", "LIST"])
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn connections_are_one_per_group_plus_one_for_all_groupless() {
    let Some(server) = RedisServer::start("stream_connections") else {
        return;
    };
    let bus = bus(&server.url(), |_| {}).await;
    assert_eq!(
        ours(&server),
        1,
        "a bus without subscriptions holds its command connection"
    );
    let mut g = Vec::new();
    let mut h = Vec::new();
    let mut solo = Vec::new();
    for p in ["a", "b.*"] {
        g.push(
            bus.subscribe(pat(p), SubscribeOptions::new().group("g"))
                .await
                .unwrap(),
        );
        h.push(
            bus.subscribe(pat(p), SubscribeOptions::new().group("h"))
                .await
                .unwrap(),
        );
    }
    for p in ["a", "b.*", "c"] {
        solo.push(
            bus.subscribe(pat(p), SubscribeOptions::new())
                .await
                .unwrap(),
        );
    }
    // command + group g + group h + one for the group-less subscriptions
    wait_connections(&server, &bus, 4).await;
    drop(h);
    wait_connections(&server, &bus, 3).await;
    drop(solo);
    wait_connections(&server, &bus, 2).await;
    drop(g);
    wait_connections(&server, &bus, 1).await;
    // A group whose reader retired starts another with its next subscription.
    let mut again = bus
        .subscribe(pat("a"), SubscribeOptions::new().group("g"))
        .await
        .unwrap();
    wait_connections(&server, &bus, 2).await;
    bus.publish(Message::new(topic("a"), &b"x"[..]))
        .await
        .unwrap();
    let d = next(&mut again).await;
    assert_eq!(&d.message().payload[..], b"x");
    d.ack().await.unwrap();
}

/// What one subscription of the seven-engine test is.
struct Spec {
    pattern: &'static str,
    group: Option<&'static str>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seven_engines_and_fifty_subscriptions_hold_the_documented_connections() {
    let Some(server) = RedisServer::start("stream_seven_engines") else {
        return;
    };
    let bus: std::sync::Arc<dyn Bus> = std::sync::Arc::new(bus(&server.url(), |_| {}).await);
    const PATTERNS: [&str; 6] = ["px.a", "px.b", "ord.a", "px.*", "ord.*", "*.a"];
    const GROUPS: [Option<&str>; 4] = [None, Some("risk"), Some("book"), Some("audit")];
    let specs: Vec<Spec> = (0..50)
        .map(|i| Spec {
            pattern: PATTERNS[(i / 4) % PATTERNS.len()],
            group: GROUPS[i % GROUPS.len()],
        })
        .collect();
    // 7 engines share the bus and subscribe at the same time, 50 subscriptions between them;
    // every delivery is forwarded (acked) tagged with its subscription's index.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, String)>();
    let mut engines = Vec::new();
    for engine in 0..7 {
        let bus = bus.clone();
        let tx = tx.clone();
        let mine: Vec<(usize, &'static str, Option<&'static str>)> = specs
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 7 == engine)
            .map(|(i, s)| (i, s.pattern, s.group))
            .collect();
        engines.push(tokio::spawn(async move {
            let mut readers = Vec::new();
            for (i, p, group) in mine {
                let mut options = SubscribeOptions::new();
                if let Some(g) = group {
                    options = options.group(g);
                }
                let mut sub = bus.subscribe(pat(p), options).await.unwrap();
                let tx = tx.clone();
                readers.push(tokio::spawn(async move {
                    while let Some(d) = sub.recv().await {
                        d.ack().await.unwrap();
                        let text = String::from_utf8(d.message().payload.to_vec()).unwrap();
                        if tx.send((i, text)).is_err() {
                            return;
                        }
                    }
                }));
            }
            readers
        }));
    }
    drop(tx);
    let mut readers = Vec::new();
    for e in engines {
        readers.extend(e.await.unwrap());
    }
    assert_eq!(readers.len(), 50);
    // 1 command connection + 3 groups (risk, book, audit) + 1 for the group-less ones.
    let list = server.cli(&["CLIENT", "LIST"]);
    assert_eq!(ours(&server), 5, "{list}");
    assert_eq!(bus.stats().connections, 5);

    let topics = ["px.a", "px.b", "ord.a", "ord.b"];
    for n in 0..10 {
        for t in topics {
            bus.publish(Message::new(topic(t), format!("{t}/{n}")))
                .await
                .unwrap();
        }
    }
    let matches = |p: &str, t: &str| pat(p).matches(&topic(t));
    // Group-less: every matching message to every such subscription. Groups: every message
    // that some member matches, once across the group, to a member that matches it.
    let mut want_groupless: std::collections::BTreeMap<usize, Vec<String>> = Default::default();
    let mut want_groups: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
    for (i, s) in specs.iter().enumerate() {
        if s.group.is_none() {
            want_groupless.insert(i, Vec::new());
        }
    }
    for n in 0..10 {
        for t in topics {
            let m = format!("{t}/{n}");
            for (i, s) in specs.iter().enumerate() {
                if s.group.is_none() && matches(s.pattern, t) {
                    want_groupless.get_mut(&i).unwrap().push(m.clone());
                }
            }
            for g in GROUPS.iter().flatten() {
                if specs
                    .iter()
                    .any(|s| s.group == Some(*g) && matches(s.pattern, t))
                {
                    want_groups.entry(g).or_default().push(m.clone());
                }
            }
        }
    }
    let total: usize = want_groupless.values().map(Vec::len).sum::<usize>()
        + want_groups.values().map(Vec::len).sum::<usize>();
    let mut got: Vec<(usize, String)> = Vec::new();
    let deadline = Instant::now() + WAIT;
    while got.len() < total && Instant::now() < deadline {
        if let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await {
            got.push(d);
        }
    }
    // Anything more would be a duplicate or a misrouted message.
    tokio::time::sleep(Duration::from_millis(700)).await;
    while let Ok(d) = rx.try_recv() {
        got.push(d);
    }
    let mut got_groupless: std::collections::BTreeMap<usize, Vec<String>> =
        want_groupless.keys().map(|&i| (i, Vec::new())).collect();
    let mut got_groups: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
    for (i, m) in got {
        let s = &specs[i];
        let t = m.split('/').next().unwrap();
        assert!(
            matches(s.pattern, t),
            "subscription {i} ({}) got {m}",
            s.pattern
        );
        match s.group {
            None => got_groupless.get_mut(&i).unwrap().push(m),
            Some(g) => got_groups.entry(g).or_default().push(m),
        }
    }
    for v in got_groupless.values_mut().chain(got_groups.values_mut()) {
        v.sort();
    }
    for v in want_groupless.values_mut().chain(want_groups.values_mut()) {
        v.sort();
    }
    assert_eq!(
        got_groupless, want_groupless,
        "group-less: every matching message each"
    );
    assert_eq!(
        got_groups, want_groups,
        "groups: every message once per group"
    );
    // Still the same connections after all that traffic.
    assert_eq!(ours(&server), 5);
    for r in readers {
        r.abort();
    }
}

#[tokio::test]
async fn a_blocked_reader_takes_new_subscriptions_and_keys_at_once() {
    let Some(server) = RedisServer::start("stream_wake") else {
        return;
    };
    // Reads block for a minute and wildcard rescans are a minute apart: everything below
    // arrives within WAIT only because the readers are woken.
    let bus = bus(&server.url(), |c| {
        c.read_block = Duration::from_secs(60);
        c.rescan_interval = Duration::from_secs(60);
    })
    .await;
    let _first = bus
        .subscribe(pat("first"), SubscribeOptions::new())
        .await
        .unwrap();
    let _first_g = bus
        .subscribe(pat("first"), SubscribeOptions::new().group("g"))
        .await
        .unwrap();
    // Both readers are now blocked on `first`; a new subscription adds a key.
    let mut late = bus
        .subscribe(pat("late"), SubscribeOptions::new())
        .await
        .unwrap();
    let mut late_g = bus
        .subscribe(pat("late"), SubscribeOptions::new().group("g"))
        .await
        .unwrap();
    // Wildcards whose key does not exist yet: this process's first publish on a matching
    // topic adds it to the index and wakes them.
    let mut wild = bus
        .subscribe(pat("md.*"), SubscribeOptions::new())
        .await
        .unwrap();
    let mut wild_g = bus
        .subscribe(pat("md.*"), SubscribeOptions::new().group("g"))
        .await
        .unwrap();
    bus.publish(Message::new(topic("late"), &b"l"[..]))
        .await
        .unwrap();
    bus.publish(Message::new(topic("md.new"), &b"m"[..]))
        .await
        .unwrap();
    for (sub, want) in [
        (&mut late, "l"),
        (&mut late_g, "l"),
        (&mut wild, "m"),
        (&mut wild_g, "m"),
    ] {
        let d = next(sub).await;
        assert_eq!(&d.message().payload[..], want.as_bytes());
        d.ack().await.unwrap();
    }
    bus.close().await.unwrap();
}

#[tokio::test]
async fn groupless_nack_ack_timeout_and_dead_letter_work_in_process() {
    let Some(server) = RedisServer::start("stream_groupless_redelivery") else {
        return;
    };
    let bus = bus(&server.url(), |c| {
        c.max_deliveries = Some(3);
        c.dead_letter = Some("dead.letters".into());
    })
    .await;
    let mut dead = bus
        .subscribe(pat("dead.letters"), SubscribeOptions::new().group("ops"))
        .await
        .unwrap();
    let mut sub = bus
        .subscribe(
            pat("jobs.*"),
            SubscribeOptions::new().ack_timeout(Duration::from_millis(300)),
        )
        .await
        .unwrap();
    let mut other = bus
        .subscribe(pat("jobs.x"), SubscribeOptions::new())
        .await
        .unwrap();
    bus.publish(Message::new(topic("jobs.x"), &b"j"[..]))
        .await
        .unwrap();
    // The other subscription acks at once and is not disturbed by this one's redeliveries.
    next(&mut other).await.ack().await.unwrap();
    let d = next(&mut sub).await;
    assert_eq!(d.attempt(), 1);
    d.nack().await.unwrap();
    let d = next(&mut sub).await;
    assert_eq!(d.attempt(), 2);
    drop(d); // neither acked nor nacked: back after the ack timeout
    let d = next(&mut sub).await;
    assert_eq!(d.attempt(), 3);
    assert_eq!(&d.message().payload[..], b"j");
    d.nack().await.unwrap();
    let d = next(&mut dead).await;
    assert_eq!(&d.message().payload[..], b"j");
    assert_eq!(d.message().headers.get("dead_letter.topic"), Some("jobs.x"));
    assert_eq!(d.message().headers.get("dead_letter.deliveries"), Some("3"));
    d.ack().await.unwrap();
    nothing(&mut sub).await;
    nothing(&mut other).await;
    assert_eq!(bus.stats().dead_lettered, 1);
    // No consumer group holds group-less deliveries.
    assert_eq!(
        server
            .cli(&["XINFO", "GROUPS", "busway:stream:jobs.x"])
            .trim(),
        ""
    );
}

#[tokio::test]
async fn a_key_that_is_not_a_stream_does_not_stop_the_shared_reader() {
    let Some(server) = RedisServer::start("stream_wrong_type") else {
        return;
    };
    let bus = bus(&server.url(), |_| {}).await;
    // Something else wrote a plain string under a key the index says is a topic.
    server.cli(&["SET", "busway:stream:md.bad", "not a stream"]);
    server.cli(&["SADD", "busway:topics", "md.bad"]);
    let mut wild = bus
        .subscribe(
            pat("md.*"),
            SubscribeOptions::new().start(StartFrom::Beginning),
        )
        .await
        .unwrap();
    let mut exact = bus
        .subscribe(pat("md.ok"), SubscribeOptions::new())
        .await
        .unwrap();
    bus.publish(Message::new(topic("md.ok"), &b"fine"[..]))
        .await
        .unwrap();
    for sub in [&mut wild, &mut exact] {
        let d = next(sub).await;
        assert_eq!(&d.message().payload[..], b"fine");
        d.ack().await.unwrap();
    }
    assert!(bus.stats().errors >= 1, "{}", bus.stats());
}

/// `INFO commandstats` calls of one command.
fn calls(server: &RedisServer, command: &str) -> u64 {
    let stats = server.cli(&["INFO", "commandstats"]);
    let prefix = format!("cmdstat_{command}:calls=");
    stats
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn concurrent_acks_share_xack_commands_and_are_all_confirmed() {
    let Some(server) = RedisServer::start("stream_ack_batch") else {
        return;
    };
    let bus = bus(&server.url(), |_| {}).await;
    let mut sub = bus
        .subscribe(pat("batch.t"), SubscribeOptions::new().group("g"))
        .await
        .unwrap();
    for i in 0..500 {
        bus.publish(Message::new(topic("batch.t"), i.to_string()))
            .await
            .unwrap();
    }
    let mut deliveries = Vec::new();
    for _ in 0..500 {
        deliveries.push(next(&mut sub).await);
    }
    assert!(pending(&server, "busway:stream:batch.t", "g").starts_with("500"));
    let before = calls(&server, "xack");
    let results = futures::future::join_all(deliveries.iter().map(|d| d.ack())).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    // Returned Ok = acked on the server: nothing is pending any more.
    assert_eq!(pending(&server, "busway:stream:batch.t", "g"), "0");
    let xacks = calls(&server, "xack") - before;
    assert!(
        xacks < 50,
        "500 concurrent acks took {xacks} XACK commands; they should share them"
    );
    // A sequential ack after the batch still works (the batcher is idle again).
    bus.publish(Message::new(topic("batch.t"), "last"))
        .await
        .unwrap();
    next(&mut sub).await.ack().await.unwrap();
    assert_eq!(pending(&server, "busway:stream:batch.t", "g"), "0");
    bus.close().await.unwrap();
}

#[tokio::test]
async fn ack_all_sends_one_xack_per_key_and_group_and_passes_other_buses_on() {
    let Some(server) = RedisServer::start("stream_ack_all") else {
        return;
    };
    // A second bus of the same transport: its acks go in its own pipeline.
    let other = bus(&server.url(), |_| {}).await;
    let bus = bus(&server.url(), |_| {}).await;
    let memory = busway::MemoryBus::stream("mem");
    let timeout = Duration::from_secs(1);
    let opts = |g: &str| SubscribeOptions::new().group(g).ack_timeout(timeout);
    let mut a = bus.subscribe(pat("jobs.a"), opts("g1")).await.unwrap();
    let mut b = bus.subscribe(pat("jobs.b"), opts("g2")).await.unwrap();
    let mut c = bus
        .subscribe(pat("jobs.c"), SubscribeOptions::new().ack_timeout(timeout))
        .await
        .unwrap();
    let mut m = memory.subscribe(pat("jobs.m"), opts("g3")).await.unwrap();
    let mut d = other.subscribe(pat("jobs.d"), opts("g4")).await.unwrap();
    for i in 0..10 {
        for t in ["jobs.a", "jobs.b", "jobs.c"] {
            bus.publish(Message::new(topic(t), format!("{i}")))
                .await
                .unwrap();
        }
        memory
            .publish(Message::new(topic("jobs.m"), format!("{i}")))
            .await
            .unwrap();
        other
            .publish(Message::new(topic("jobs.d"), format!("{i}")))
            .await
            .unwrap();
    }
    let mut batch = Vec::new();
    for sub in [&mut a, &mut b, &mut c, &mut m, &mut d] {
        for _ in 0..10 {
            batch.push(next(sub).await);
        }
    }
    assert_eq!(pending(&server, "busway:stream:jobs.a", "g1"), "10");
    let xacks = calls(&server, "xack");
    busway::Delivery::ack_all(&batch).await.unwrap();
    assert_eq!(
        calls(&server, "xack") - xacks,
        3,
        "one XACK for the 10 entries of g1, one for the 10 of g2 (one bus) and one for g4 (the other)"
    );
    assert_eq!(pending(&server, "busway:stream:jobs.a", "g1"), "0");
    assert_eq!(pending(&server, "busway:stream:jobs.b", "g2"), "0");
    assert_eq!(pending(&server, "busway:stream:jobs.d", "g4"), "0");
    drop(batch);
    // Past the ack timeout nothing is delivered again: the group-less entries and the
    // memory bus's were settled too.
    tokio::time::sleep(timeout).await;
    for sub in [&mut a, &mut b, &mut c, &mut m, &mut d] {
        nothing(sub).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_held_by_a_closed_consumer_go_to_the_next_one_at_once() {
    let Some(server) = RedisServer::start("stream_hand_back") else {
        return;
    };
    let config = |c: &mut RedisConfig| {
        c.read_block = Duration::from_millis(200);
        c.rescan_interval = Duration::from_millis(200);
        c.max_deliveries = Some(3);
        c.dead_letter = Some("dead".into());
    };
    let publisher = bus(&server.url(), |_| {}).await;
    let mut dead = publisher
        .subscribe(pat("dead"), SubscribeOptions::new().group("dead"))
        .await
        .unwrap();
    let start = Instant::now();
    let mut handled = std::collections::BTreeSet::new();
    let mut attempts = Vec::new();
    // Eight instances of one consumer: the first seven each handle one message and go (the
    // even ones drop their subscription before closing, the odd ones close first); the
    // eighth handles the rest. Each reads everything pending into its queue at once.
    for instance in 0..8 {
        let consumer = bus(&server.url(), config).await;
        let mut sub = consumer
            .subscribe(pat("jobs"), SubscribeOptions::new().group("workers"))
            .await
            .unwrap();
        if instance == 0 {
            for i in 0..20 {
                publisher
                    .publish(Message::new(topic("jobs"), format!("{i}").into_bytes()))
                    .await
                    .unwrap();
            }
        }
        let want = if instance < 7 { 1 } else { 20 - handled.len() };
        for _ in 0..want {
            let d = next(&mut sub).await;
            attempts.push(d.attempt());
            handled.insert(String::from_utf8(d.message().payload.to_vec()).unwrap());
            d.ack().await.unwrap();
        }
        if instance % 2 == 0 {
            drop(sub);
            consumer.close().await.unwrap();
        } else {
            consumer.close().await.unwrap();
            drop(sub);
        }
    }
    let took = start.elapsed();
    assert_eq!(handled.len(), 20, "handled {handled:?}");
    assert!(
        took < Duration::from_secs(15),
        "20 messages over 8 instances took {took:?} (the claim time is 30 s)"
    );
    assert!(
        attempts.iter().all(|&a| a == 1),
        "entries the handlers never saw are not counted as attempts: {attempts:?}"
    );
    assert!(
        dead.recv_timeout(Duration::from_millis(300)).await.is_err(),
        "nothing dead-lettered"
    );
    let pending = pending(&server, "busway:stream:jobs", "workers");
    assert_eq!(pending.lines().next(), Some("0"), "XPENDING: {pending}");
    println!(
        "RESULT stream_hand_back handled=20 instances=8 took_ms={}",
        took.as_millis()
    );
}
