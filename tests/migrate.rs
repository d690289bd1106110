//! Migration support on memory buses: mirror de-duplication and live reload of the routing
//! table with open subscriptions (exact loss and duplicate counts).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use busway::{
    Bus, Config, ErrorKind, MemoryBus, Message, Pattern, Registry, Router, SubscribeOptions,
    Subscription, Topic,
};

const WAIT: Duration = Duration::from_secs(10);

fn mem(name: &str) -> Arc<dyn Bus> {
    Arc::new(MemoryBus::new(name))
}

fn pattern(s: &str) -> Pattern {
    Pattern::new(s).unwrap()
}

fn msg(t: &str, payload: impl Into<String>) -> Message {
    Message::new(Topic::new(t).unwrap(), payload.into().into_bytes())
}

async fn next(sub: &mut Subscription) -> Message {
    sub.recv_timeout(WAIT)
        .await
        .expect("a delivery in time")
        .expect("subscription still open")
        .into_message()
}

/// Asserts nothing more arrives (a short wait: only to catch an extra copy).
async fn nothing_more(sub: &mut Subscription) {
    if let Ok(Some(d)) = sub.recv_timeout(Duration::from_millis(200)).await {
        panic!("unexpected extra delivery {:?}", d.message());
    }
}

#[tokio::test]
async fn a_mirror_subscriber_gets_each_message_once() {
    let (a, b) = (mem("a"), mem("b"));
    let router = Router::builder()
        .bus("a", a.clone())
        .bus("b", b.clone())
        .route("mirror.>", &["a", "b"])
        .default_to(&["a"])
        .build()
        .unwrap();
    let mut sub = router
        .subscribe(pattern("mirror.>"), SubscribeOptions::new())
        .await
        .unwrap();
    for i in 0..100 {
        router
            .publish(msg("mirror.x", i.to_string()))
            .await
            .unwrap();
    }
    let mut seen = BTreeSet::new();
    for _ in 0..100 {
        let m = next(&mut sub).await;
        assert!(seen.insert(m.headers.id.clone().unwrap()), "a duplicate id");
    }
    nothing_more(&mut sub).await;
    let stats = sub.stats();
    assert_eq!(stats.delivered, 100, "{stats}");
    assert_eq!(stats.duplicates, 100, "{stats}");
    assert_eq!(a.stats().published + b.stats().published, 200);
}

#[tokio::test]
async fn without_a_window_mirror_copies_all_arrive() {
    let router = Router::builder()
        .bus("a", mem("a"))
        .bus("b", mem("b"))
        .route("mirror.>", &["a", "b"])
        .dedup_window(0)
        .build()
        .unwrap();
    let mut sub = router
        .subscribe(pattern("mirror.>"), SubscribeOptions::new())
        .await
        .unwrap();
    router.publish(msg("mirror.x", "one")).await.unwrap();
    let (x, y) = (next(&mut sub).await, next(&mut sub).await);
    assert_eq!(x, y);
    assert_eq!(sub.stats().duplicates, 0);
}

#[tokio::test]
async fn the_window_is_bounded_and_counts_evictions() {
    let (a, b) = (mem("a"), mem("b"));
    let router = Router::builder()
        .bus("a", a.clone())
        .bus("b", b.clone())
        .route("m.>", &["a", "b"])
        .dedup_window(4)
        .build()
        .unwrap();
    let mut sub = router
        .subscribe(pattern("m.>"), SubscribeOptions::new())
        .await
        .unwrap();
    // "first" is delivered, then five newer ids push it out of the 4-id window: its late
    // copy on the other bus is delivered again. "last"'s copy is still in the window.
    a.publish(msg("m.x", "1").with_id("first")).await.unwrap();
    for i in 0..5 {
        a.publish(msg("m.x", "n").with_id(format!("id-{i}")))
            .await
            .unwrap();
    }
    a.publish(msg("m.x", "2").with_id("last")).await.unwrap();
    for _ in 0..7 {
        next(&mut sub).await;
    }
    b.publish(msg("m.x", "1").with_id("first")).await.unwrap();
    b.publish(msg("m.x", "2").with_id("last")).await.unwrap();
    assert_eq!(next(&mut sub).await.headers.id.as_deref(), Some("first"));
    nothing_more(&mut sub).await;
    let stats = sub.stats();
    assert_eq!(stats.duplicates, 1, "{stats}");
    // 8 ids entered the 4-id window ("first" twice): 4 evictions.
    assert_eq!(stats.dedup_evictions, 4, "{stats}");
}

/// Publishes `seq` numbers on `topic` until `stop`, counting what was accepted.
fn publisher(
    router: Arc<Router>,
    topic: &'static str,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            router
                .publish(msg(topic, i.to_string()))
                .await
                .expect("publish during reload");
            i += 1;
            sent.store(i, Ordering::Relaxed);
            if i % 32 == 0 {
                tokio::task::yield_now().await;
            }
        }
    })
}

/// Receives on `sub` into a shared count, recording every sequence number.
fn receiver(
    mut sub: Subscription,
    got: Arc<parking_lot::Mutex<Vec<u64>>>,
) -> tokio::task::JoinHandle<Subscription> {
    tokio::spawn(async move {
        while let Ok(Some(d)) = sub.recv_timeout(Duration::from_millis(1500)).await {
            let seq: u64 = std::str::from_utf8(&d.message().payload)
                .unwrap()
                .parse()
                .unwrap();
            got.lock().push(seq);
        }
        sub
    })
}

async fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Every number below `sent` exactly once.
fn assert_exact(got: &[u64], sent: u64) {
    let distinct: BTreeSet<u64> = got.iter().copied().collect();
    let duplicates = got.len() - distinct.len();
    let lost = (0..sent).filter(|i| !distinct.contains(i)).count();
    assert_eq!(
        (lost, duplicates),
        (0, 0),
        "sent {sent}, received {}",
        got.len()
    );
    assert!(distinct.iter().all(|i| *i < sent));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_moves_a_topic_under_load_without_loss_or_duplicates() {
    let (a, b, c) = (mem("a"), mem("b"), mem("c"));
    let router = Arc::new(
        Router::builder()
            .bus("a", a.clone())
            .bus("b", b.clone())
            .route("orders.>", &["a"])
            .default_to(&["b"])
            .drain_grace(Duration::from_millis(100))
            .build()
            .unwrap(),
    );
    let sub = router
        .subscribe(pattern("orders.>"), SubscribeOptions::new())
        .await
        .unwrap();
    let got = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let rx = receiver(sub, got.clone());
    let (stop, sent) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let tx = publisher(router.clone(), "orders.new", stop.clone(), sent.clone());

    wait_for("traffic on a", || got.lock().len() > 2_000).await;
    // Step 1: move orders to b (a stays, as a bus nothing routes to is still a bus).
    let report = router
        .reload_with(
            Router::builder()
                .bus("a", a.clone())
                .bus("b", b.clone())
                .route("orders.>", &["b"])
                .default_to(&["b"]),
        )
        .await
        .unwrap();
    assert_eq!(report.kept, ["a", "b"]);
    assert_eq!((report.subscriptions, report.moved), (1, 1));
    let at = got.lock().len();
    wait_for("traffic on b", || got.lock().len() > at + 2_000).await;
    // Step 2: move them on to a new bus c; a and b are retired (drained and closed).
    let report = router
        .reload_with(
            Router::builder()
                .bus("c", c.clone())
                .route("orders.>", &["c"])
                .default_to(&["c"]),
        )
        .await
        .unwrap();
    assert_eq!(
        (report.added, report.removed),
        (
            vec!["c".to_string()],
            vec!["a".to_string(), "b".to_string()]
        )
    );
    let at = got.lock().len();
    wait_for("traffic on c", || got.lock().len() > at + 2_000).await;
    stop.store(true, Ordering::Relaxed);
    tx.await.unwrap();
    let sent = sent.load(Ordering::Relaxed);
    wait_for("everything received", || got.lock().len() as u64 >= sent).await;
    let sub = rx.await.unwrap();
    assert_exact(&got.lock(), sent);
    for (bus, name) in [(&a, "a"), (&b, "b"), (&c, "c")] {
        assert!(bus.stats().published > 0, "bus {name} carried orders");
    }
    assert_eq!(a.stats().health, busway::Health::Closed);
    assert_eq!(b.stats().health, busway::Health::Closed);
    let stats = sub.stats();
    assert_eq!(stats.delivered, sent, "{stats}");
    assert_eq!(stats.duplicates, 0, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_through_a_mirror_step_drops_the_copies() {
    // The migration's real sequence: a -> mirror [a, b] -> b, under load.
    let (a, b) = (mem("a"), mem("b"));
    let build = |to: &[&str]| {
        Router::builder()
            .bus("a", a.clone())
            .bus("b", b.clone())
            .route("orders.>", to)
            .drain_grace(Duration::from_millis(100))
    };
    let router = Arc::new(build(&["a"]).build().unwrap());
    let sub = router
        .subscribe(pattern("orders.>"), SubscribeOptions::new())
        .await
        .unwrap();
    let got = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let rx = receiver(sub, got.clone());
    let (stop, sent) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let tx = publisher(router.clone(), "orders.new", stop.clone(), sent.clone());
    for to in [&["a", "b"][..], &["b"][..]] {
        let at = got.lock().len();
        wait_for("traffic", || got.lock().len() > at + 2_000).await;
        router.reload_with(build(to)).await.unwrap();
    }
    let at = got.lock().len();
    wait_for("traffic on b", || got.lock().len() > at + 2_000).await;
    stop.store(true, Ordering::Relaxed);
    tx.await.unwrap();
    let sent = sent.load(Ordering::Relaxed);
    wait_for("everything received", || got.lock().len() as u64 >= sent).await;
    let sub = rx.await.unwrap();
    assert_exact(&got.lock(), sent);
    let stats = sub.stats();
    assert!(stats.duplicates > 0, "the mirror step made copies: {stats}");
    // Every mirrored message was published twice; exactly one copy of each was dropped.
    let copies = a.stats().published + b.stats().published - sent;
    assert_eq!(stats.duplicates, copies, "{stats}");
}

#[tokio::test]
async fn a_backlog_queued_before_a_reload_is_still_delivered() {
    // The subscriber is not reading while the topic moves off a bus it keeps listening on
    // (for other topics): what was queued there under the old table must still arrive.
    let (a, main) = (mem("a"), mem("main"));
    let router = Router::builder()
        .bus("a", a.clone())
        .bus("main", main.clone())
        .route("t.>", &["a"])
        .route("u.>", &["a"])
        .default_to(&["main"])
        .drain_grace(Duration::from_millis(20))
        .build()
        .unwrap();
    let mut sub = router
        .subscribe(pattern(">"), SubscribeOptions::new())
        .await
        .unwrap();
    for i in 0..50 {
        router.publish(msg("t.x", i.to_string())).await.unwrap();
    }
    router
        .reload_with(
            Router::builder()
                .bus("a", a.clone())
                .bus("main", main.clone())
                .route("t.>", &["main"])
                .route("u.>", &["a"])
                .default_to(&["main"]),
        )
        .await
        .unwrap();
    for i in 50..100 {
        router.publish(msg("t.x", i.to_string())).await.unwrap();
    }
    router.publish(msg("u.y", "u")).await.unwrap();
    let mut seqs = Vec::new();
    let mut us = 0;
    for _ in 0..101 {
        let m = next(&mut sub).await;
        match m.topic.as_str() {
            "t.x" => seqs.push(
                String::from_utf8(m.payload.to_vec())
                    .unwrap()
                    .parse()
                    .unwrap(),
            ),
            _ => us += 1,
        }
    }
    assert_eq!(us, 1);
    assert_exact(&seqs, 100);
    // Once the backlog is through, a t.x published straight on `a` is not what the table
    // puts there any more: filtered out.
    a.publish(msg("t.x", "stray")).await.unwrap();
    router.publish(msg("t.x", "100")).await.unwrap();
    assert_eq!(next(&mut sub).await.payload, "100".as_bytes());
    nothing_more(&mut sub).await;
}

#[tokio::test]
async fn reload_from_config_keeps_unchanged_buses_and_rebuilds_changed_ones() {
    let first = r#"
[app]
name = "portfolio"
[buses.a]
transport = "memory"
[buses.b]
transport = "memory"
[buses.old]
transport = "memory"
[[routes]]
match = "orders.>"
to = "a"
[default]
to = "old"
"#;
    let second = r#"
[app]
name = "portfolio"
[buses.a]
transport = "memory"
[buses.b]
transport = "memory"
capacity = 16
[buses.new]
transport = "memory"
[[routes]]
match = "orders.>"
to = "b"
[default]
to = "new"
"#;
    let registry = Registry::new();
    let router = Router::from_config(&Config::from_toml(first, "first.toml").unwrap(), &registry)
        .await
        .unwrap();
    let a = router.bus("a").unwrap();
    let old_b = router.bus("b").unwrap();
    let mut sub = router
        .subscribe(pattern("orders.>"), SubscribeOptions::new())
        .await
        .unwrap();
    router.publish(msg("orders.x", "before")).await.unwrap();
    let report = router
        .reload(
            &Config::from_toml(second, "second.toml").unwrap(),
            &registry,
        )
        .await
        .unwrap();
    assert_eq!(report.kept, ["a"]);
    assert_eq!(report.added, ["b", "new"], "b's config changed: a new bus");
    assert_eq!(report.removed, ["b", "old"]);
    assert!(Arc::ptr_eq(&router.bus("a").unwrap(), &a));
    assert!(!Arc::ptr_eq(&router.bus("b").unwrap(), &old_b));
    assert_eq!(old_b.stats().health, busway::Health::Closed);
    assert_eq!(
        &*router.route(&Topic::new("orders.x").unwrap()).unwrap()[0],
        "b"
    );
    router.publish(msg("orders.x", "after")).await.unwrap();
    assert_eq!(next(&mut sub).await.payload, "before".as_bytes());
    assert_eq!(next(&mut sub).await.payload, "after".as_bytes());
    assert!(report.to_string().contains("removed: b, old"), "{report}");
}

#[tokio::test]
async fn a_reload_that_cannot_carry_an_open_subscription_changes_nothing() {
    let (a, b) = (mem("a"), mem("b"));
    let router = Router::builder()
        .bus("a", a.clone())
        .bus("b", b.clone())
        .route("orders.>", &["a"])
        .build()
        .unwrap();
    let mut sub = router
        .subscribe(pattern("orders.>"), SubscribeOptions::new())
        .await
        .unwrap();
    let err = router
        .reload_with(
            Router::builder()
                .bus("a", a.clone())
                .bus("b", b.clone())
                .route("quotes.>", &["b"]),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NoRoute);
    assert!(err.to_string().contains("\"orders.>\""), "{err}");
    assert_eq!(
        &*router.route(&Topic::new("orders.x").unwrap()).unwrap()[0],
        "a"
    );
    router.publish(msg("orders.x", "still")).await.unwrap();
    assert_eq!(next(&mut sub).await.payload, "still".as_bytes());
    assert_ne!(a.stats().health, busway::Health::Closed);
}

#[tokio::test]
async fn dropped_subscriptions_are_not_moved() {
    let (a, b) = (mem("a"), mem("b"));
    let router = Router::builder()
        .bus("a", a.clone())
        .bus("b", b.clone())
        .route("orders.>", &["a"])
        .drain_grace(Duration::ZERO)
        .build()
        .unwrap();
    let keep = router
        .subscribe(pattern("orders.>"), SubscribeOptions::new())
        .await
        .unwrap();
    drop(
        router
            .subscribe(pattern("orders.>"), SubscribeOptions::new())
            .await
            .unwrap(),
    );
    let report = router
        .reload_with(
            Router::builder()
                .bus("a", a.clone())
                .bus("b", b.clone())
                .route("orders.>", &["b"]),
        )
        .await
        .unwrap();
    assert_eq!(report.subscriptions, 1);
    drop(keep);
}
