//! MemoryBus behaviour beyond the conformance suite: ack timeouts, retention, slow
//! consumers, blocking publishers, durable groups and the config factory.

use std::sync::Arc;
use std::time::Duration;

use busway::{
    config::QueueDefaults, memory::MemoryConfig, transport::BuildContext, Bus, Config, ErrorKind,
    Health, MemoryBus, Message, Mode, Overflow, Pattern, Registry, StartFrom, SubscribeOptions,
    Subscription, Topic,
};

const WAIT: Duration = Duration::from_secs(10);

fn topic(s: &str) -> Topic {
    Topic::new(s).unwrap()
}

fn pattern(s: &str) -> Pattern {
    Pattern::new(s).unwrap()
}

async fn recv(s: &mut Subscription) -> busway::Delivery {
    s.recv_timeout(WAIT)
        .await
        .expect("a delivery in time")
        .expect("subscription open")
}

fn text(d: &busway::Delivery) -> String {
    String::from_utf8_lossy(&d.message().payload).into_owned()
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn unacked_delivery_comes_back_after_the_ack_timeout() {
    let bus = MemoryBus::stream("s");
    let mut s = bus
        .subscribe(
            pattern("jobs"),
            SubscribeOptions::new().ack_timeout(Duration::from_millis(100)),
        )
        .await
        .unwrap();
    bus.publish(Message::new(topic("jobs"), "j1"))
        .await
        .unwrap();
    let first = recv(&mut s).await;
    assert_eq!((text(&first), first.attempt()), ("j1".into(), 1));
    // Neither acked nor nacked: it must come back on its own.
    let again = recv(&mut s).await;
    assert_eq!((text(&again), again.attempt()), ("j1".into(), 2));
    again.ack().await.unwrap();
    assert!(bus.stats().redelivered >= 1);
    assert!(s.stats().redelivered >= 1);
    // Acked: no third attempt, even after several ack timeouts.
    assert!(s.recv_timeout(Duration::from_millis(400)).await.is_err());
    drop(first);
}

#[tokio::test]
async fn nack_with_delay_redelivers_later_not_at_once() {
    let bus = MemoryBus::stream("s");
    let mut s = bus
        .subscribe(pattern("jobs"), SubscribeOptions::new())
        .await
        .unwrap();
    bus.publish(Message::new(topic("jobs"), "j1"))
        .await
        .unwrap();
    let d = recv(&mut s).await;
    let nacked_at = tokio::time::Instant::now();
    d.nack_after(Duration::from_millis(300)).await.unwrap();
    let again = recv(&mut s).await;
    assert!(
        nacked_at.elapsed() >= Duration::from_millis(300),
        "came back too early"
    );
    assert_eq!(again.attempt(), 2);
    again.ack().await.unwrap();
}

#[tokio::test]
async fn stream_retains_only_the_newest_entries_per_topic() {
    let bus = MemoryBus::with_config("s", MemoryConfig::new(Mode::Stream).retain(3));
    for i in 0..10 {
        bus.publish(Message::new(topic("log.a"), format!("{i}")))
            .await
            .unwrap();
    }
    bus.publish(Message::new(topic("log.b"), "b0"))
        .await
        .unwrap();
    let mut s = bus
        .subscribe(
            pattern("log.*"),
            SubscribeOptions::new().start(StartFrom::Beginning),
        )
        .await
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..4 {
        let d = recv(&mut s).await;
        d.ack().await.unwrap();
        got.push(text(&d));
    }
    got.sort();
    assert_eq!(got, ["7", "8", "9", "b0"]);
    assert!(s.recv_timeout(Duration::from_millis(200)).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_subscriber_under_drop_policy_never_delays_another() {
    let bus = MemoryBus::new("b");
    let stalled = bus
        .subscribe(
            pattern("px"),
            SubscribeOptions::new()
                .capacity(2)
                .overflow(Overflow::DropNewest),
        )
        .await
        .unwrap();
    let mut fast = bus
        .subscribe(
            pattern("px"),
            SubscribeOptions::new()
                .capacity(10_000)
                .overflow(Overflow::Block),
        )
        .await
        .unwrap();
    let publisher = {
        let bus = bus.clone();
        tokio::spawn(async move {
            for i in 0..2000 {
                bus.publish(Message::new(topic("px"), format!("{i}")))
                    .await
                    .unwrap();
            }
        })
    };
    tokio::time::timeout(WAIT, publisher)
        .await
        .expect("publisher never waits")
        .unwrap();
    for i in 0..2000 {
        assert_eq!(text(&recv(&mut fast).await), i.to_string());
    }
    assert_eq!(stalled.stats().dropped, 1998);
    assert_eq!(stalled.pending(), 2);
    assert_eq!(bus.stats().dropped, 1998);
    assert_eq!(fast.stats().dropped, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_policy_makes_the_publisher_wait_for_room() {
    let bus = MemoryBus::new("b");
    let mut s = bus
        .subscribe(
            pattern("q"),
            SubscribeOptions::new()
                .capacity(2)
                .overflow(Overflow::Block),
        )
        .await
        .unwrap();
    let publisher = {
        let bus = bus.clone();
        tokio::spawn(async move {
            for i in 0..5 {
                bus.publish(Message::new(topic("q"), format!("{i}")))
                    .await
                    .unwrap();
            }
        })
    };
    wait_until("queue full", || s.pending() == 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !publisher.is_finished(),
        "the publisher must wait while the queue is full"
    );
    assert_eq!(s.pending(), 2);
    for i in 0..5 {
        assert_eq!(text(&recv(&mut s).await), i.to_string());
    }
    tokio::time::timeout(WAIT, publisher)
        .await
        .expect("publisher resumes")
        .unwrap();
    assert_eq!(s.stats().dropped, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_releases_a_publisher_blocked_on_a_full_queue() {
    let bus = MemoryBus::new("b");
    let s = bus
        .subscribe(
            pattern("q"),
            SubscribeOptions::new()
                .capacity(1)
                .overflow(Overflow::Block),
        )
        .await
        .unwrap();
    let publisher = {
        let bus = bus.clone();
        tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for i in 0..3 {
                outcomes.push(bus.publish(Message::new(topic("q"), format!("{i}"))).await);
            }
            outcomes
        })
    };
    wait_until("queue full", || s.pending() == 1).await;
    bus.close().await.unwrap();
    let outcomes = tokio::time::timeout(WAIT, publisher)
        .await
        .expect("publisher released")
        .unwrap();
    assert_eq!(bus.stats().health, Health::Closed);
    // The first publish reached the queue; the one waiting for room when `close` came never
    // got there, and the one after it came after `close`: neither may say Ok.
    assert!(outcomes[0].is_ok(), "{outcomes:?}");
    for o in &outcomes[1..] {
        assert_eq!(
            o.as_ref().unwrap_err().kind(),
            ErrorKind::Closed,
            "{outcomes:?}"
        );
    }
}

/// Racing publishers under `block`: every publish that returns Ok is delivered, however
/// `close` interleaves with them; the others fail with `Closed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_racing_blocked_publishers_never_acknowledges_a_lost_message() {
    for _round in 0..5 {
        let bus = MemoryBus::new("b");
        let mut s = bus
            .subscribe(
                pattern("q.*"),
                SubscribeOptions::new()
                    .capacity(4)
                    .overflow(Overflow::Block),
            )
            .await
            .unwrap();
        let publishers: Vec<_> = (0..20)
            .map(|p| {
                let bus = bus.clone();
                tokio::spawn(async move {
                    let mut ok = 0u64;
                    for i in 0..50 {
                        let m = Message::new(topic(&format!("q.{p}")), format!("{i}"));
                        if bus.publish(m).await.is_ok() {
                            ok += 1;
                        }
                    }
                    ok
                })
            })
            .collect();
        let reader = tokio::spawn(async move {
            let mut n = 0u64;
            while let Some(d) = s.recv().await {
                let _ = d;
                n += 1;
                if n % 7 == 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            n
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
        bus.close().await.unwrap();
        let mut ok = 0;
        for p in publishers {
            ok += tokio::time::timeout(WAIT, p).await.unwrap().unwrap();
        }
        let delivered = tokio::time::timeout(WAIT, reader).await.unwrap().unwrap();
        assert_eq!(delivered, ok, "delivered vs publishes that returned Ok");
    }
}

/// A stream bus with `close_timeout`, one `block` subscription of capacity 1 on `t`, and three
/// Ok'd publishes to `t`: one queued, two still owed to the subscriber.
async fn three_published_to_a_queue_of_one(close_timeout: Duration) -> (MemoryBus, Subscription) {
    let bus = MemoryBus::with_config(
        "s",
        MemoryConfig::new(Mode::Stream).close_timeout(close_timeout),
    );
    let s = bus
        .subscribe(
            pattern("t"),
            SubscribeOptions::new()
                .capacity(1)
                .overflow(Overflow::Block),
        )
        .await
        .unwrap();
    for i in 0..3 {
        bus.publish(Message::new(topic("t"), format!("{i}")))
            .await
            .unwrap();
    }
    (bus, s)
}

/// Stream mode: `close` lets subscribers take what was published before it (they still read
/// their queues to the end), and counts in `dropped` whatever they did not take in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_close_delivers_every_accepted_publish_or_counts_it() {
    let (bus, mut s) = three_published_to_a_queue_of_one(Duration::from_secs(10)).await;
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        while let Some(d) = s.recv().await {
            got.push(text(&d));
            d.ack().await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        got
    });
    bus.close().await.unwrap();
    let got = tokio::time::timeout(WAIT, reader).await.unwrap().unwrap();
    assert_eq!(got, ["0", "1", "2"]);
    assert_eq!(bus.stats().dropped, 0);

    // A subscriber that never reads: `close` gives up after its timeout and counts the rest.
    let (bus, s) = three_published_to_a_queue_of_one(Duration::from_millis(50)).await;
    bus.close().await.unwrap();
    assert_eq!(s.pending(), 1, "the one queued stays readable");
    assert_eq!(
        bus.stats().dropped,
        2,
        "the two never handed over are counted"
    );
}

#[tokio::test]
async fn named_group_resumes_where_it_left_off() {
    let bus = MemoryBus::stream("s");
    let opts = || SubscribeOptions::new().group("portfolio");
    let mut s = bus.subscribe(pattern("fills"), opts()).await.unwrap();
    for i in 0..3 {
        bus.publish(Message::new(topic("fills"), format!("{i}")))
            .await
            .unwrap();
    }
    for i in 0..3 {
        let d = recv(&mut s).await;
        assert_eq!(text(&d), i.to_string());
        d.ack().await.unwrap();
    }
    drop(s);
    for i in 3..5 {
        bus.publish(Message::new(topic("fills"), format!("{i}")))
            .await
            .unwrap();
    }
    // The group (not the subscription) owns the cursor: a restarted member gets 3 and 4 only.
    let mut s = bus.subscribe(pattern("fills"), opts()).await.unwrap();
    for i in 3..5 {
        let d = recv(&mut s).await;
        assert_eq!(text(&d), i.to_string());
        d.ack().await.unwrap();
    }
    assert!(s.recv_timeout(Duration::from_millis(200)).await.is_err());
}

#[tokio::test]
async fn a_leaving_member_hands_its_unacked_entries_to_the_group() {
    let bus = MemoryBus::stream("s");
    let opts = || SubscribeOptions::new().group("g");
    let mut a = bus.subscribe(pattern("w"), opts()).await.unwrap();
    let mut b = bus.subscribe(pattern("w"), opts()).await.unwrap();
    bus.publish(Message::new(topic("w"), "0")).await.unwrap();
    bus.publish(Message::new(topic("w"), "1")).await.unwrap();
    let da = recv(&mut a).await;
    let db = recv(&mut b).await;
    db.ack().await.unwrap();
    let lost = text(&da);
    drop(da);
    drop(a);
    let again = recv(&mut b).await;
    assert_eq!(text(&again), lost);
    assert_eq!(again.attempt(), 2);
    again.ack().await.unwrap();
}

#[tokio::test]
async fn request_without_subscribers_is_no_responders_in_broadcast_mode() {
    let bus = MemoryBus::new("b");
    let err = bus
        .request(Message::new(topic("rpc.none"), "x"), Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NoResponders);
    assert!(err.to_string().contains("rpc.none"), "{err}");
}

#[tokio::test]
async fn stats_and_capabilities_follow_the_mode() {
    let b = MemoryBus::new("b");
    let s = MemoryBus::stream("s");
    assert_eq!(b.capabilities().mode, Mode::Broadcast);
    assert!(!b.capabilities().ack && !b.capabilities().replay);
    assert!(s.capabilities().ack && s.capabilities().replay);
    let err = b
        .subscribe(
            pattern("x"),
            SubscribeOptions::new().start(StartFrom::Beginning),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    b.publish(Message::new(topic("x"), "1")).await.unwrap();
    let st = b.stats();
    assert_eq!(
        (st.published, st.connections, st.health),
        (1, 0, Health::Up)
    );
    b.close().await.unwrap();
    assert_eq!(b.stats().health, Health::Closed);
}

async fn build(toml: &str) -> busway::Result<Arc<dyn Bus>> {
    let config = Config::from_toml(toml, "busway.toml")?;
    let bus = config.buses.get("m").expect("bus m");
    Registry::new()
        .build_context(BuildContext {
            app: "test",
            bus: "m",
            config: bus,
            source: "busway.toml",
        })
        .await
}

#[tokio::test]
async fn factory_reads_mode_queue_defaults_and_its_own_keys() {
    let bus = build(
        "[buses.m]\ntransport = \"memory\"\nmode = \"stream\"\nurl = \"memory://ignored\"\n\
         capacity = 1\noverflow = \"drop_newest\"\nretain = 2\nmax_payload = 10\n\
         [[routes]]\nmatch = \">\"\nto = \"m\"\n",
    )
    .await
    .unwrap();
    let caps = bus.capabilities();
    assert_eq!((caps.mode, caps.max_payload), (Mode::Stream, 10));
    let err = bus
        .publish(Message::new(topic("t"), vec![0u8; 11]))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PayloadTooLarge);
    for i in 0..3 {
        bus.publish(Message::new(topic("t"), format!("{i}")))
            .await
            .unwrap();
    }
    // retain = 2 keeps "1" and "2"; capacity 1 under drop_newest queues only "1".
    let mut s = bus
        .subscribe(
            pattern("t"),
            SubscribeOptions::new().start(StartFrom::Beginning),
        )
        .await
        .unwrap();
    let d = recv(&mut s).await;
    assert_eq!(text(&d), "1");
    assert_eq!(s.stats().dropped, 1);
}

#[tokio::test]
async fn factory_rejects_unknown_keys_naming_file_and_key() {
    let err = build(
        "[buses.m]\ntransport = \"memory\"\nretian = 5\n[[routes]]\nmatch = \">\"\nto = \"m\"\n",
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    let msg = err.to_string();
    assert!(msg.contains("busway.toml"), "{msg}");
    assert!(msg.contains("buses.m"), "{msg}");
    assert!(msg.contains("retian"), "{msg}");

    let err = build(
        "[buses.m]\ntransport = \"memory\"\nretain = 0\n[[routes]]\nmatch = \">\"\nto = \"m\"\n",
    )
    .await
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("busway.toml") && msg.contains("buses.m.retain"),
        "{msg}"
    );
}

#[test]
fn memory_config_builders() {
    let c = MemoryConfig::new(Mode::Stream)
        .retain(0)
        .max_payload(5)
        .queue(QueueDefaults {
            capacity: 3,
            overflow: Overflow::Latest,
        });
    assert_eq!(
        (c.mode, c.retain, c.max_payload, c.queue.capacity),
        (Mode::Stream, 1, 5, 3)
    );
}

#[tokio::test]
async fn recv_many_takes_what_is_queued_up_to_the_limit() {
    let bus = MemoryBus::new("batch");
    let mut sub = bus
        .subscribe(Pattern::new("b.>").unwrap(), SubscribeOptions::new())
        .await
        .unwrap();
    assert!(sub.try_recv().is_none(), "nothing queued yet");
    for i in 0..5u8 {
        bus.publish(Message::try_new("b.x", vec![i]).unwrap())
            .await
            .unwrap();
    }
    let mut batch = Vec::new();
    assert_eq!(sub.recv_many(&mut batch, 3).await, 3);
    assert_eq!(sub.recv_many(&mut batch, 3).await, 2, "only two were left");
    let payloads: Vec<u8> = batch.iter().map(|d| d.message().payload[0]).collect();
    assert_eq!(payloads, vec![0, 1, 2, 3, 4], "in publish order");
    bus.close().await.unwrap();
    assert_eq!(sub.recv_many(&mut batch, 3).await, 0, "ended after close");
}

#[tokio::test]
async fn a_publish_delivers_when_called_even_if_its_future_is_never_awaited() {
    let bus = MemoryBus::new("b");
    let mut s = bus
        .subscribe(pattern("q.*"), SubscribeOptions::new())
        .await
        .unwrap();
    drop(bus.publish(Message::new(topic("q.a"), "one")));
    assert_eq!(s.pending(), 1);
    assert_eq!(text(&recv(&mut s).await), "one");
}

#[tokio::test]
async fn a_publish_blocked_by_a_full_queue_has_reached_the_other_subscribers_already() {
    let bus = MemoryBus::new("b");
    let mut full = bus
        .subscribe(
            pattern("q"),
            SubscribeOptions::new()
                .capacity(1)
                .overflow(Overflow::Block),
        )
        .await
        .unwrap();
    let mut other = bus
        .subscribe(pattern("q"), SubscribeOptions::new())
        .await
        .unwrap();
    bus.publish(Message::new(topic("q"), "first"))
        .await
        .unwrap();
    let waiting = bus.publish(Message::new(topic("q"), "second"));
    assert_eq!(other.pending(), 2, "the other subscriber has both already");
    assert_eq!(
        full.pending(),
        1,
        "the full queue takes the second when it has room"
    );
    assert_eq!(text(&recv(&mut full).await), "first");
    waiting.await.unwrap();
    assert_eq!(text(&recv(&mut full).await), "second");
    assert_eq!(text(&recv(&mut other).await), "first");
    assert_eq!(text(&recv(&mut other).await), "second");
}
