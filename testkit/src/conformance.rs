//! The conformance suite: written once against `Arc<dyn Bus>`, run for every transport.
//!
//! Each case is a `pub async fn case(f: &Fixture)` that panics with a clear message when the
//! bus misbehaves, and prints `SKIPPED <case>: <reason>` (then returns) only when the bus's
//! [`Capabilities`] declare it cannot do what the case needs.
//! [`conformance_tests!`](crate::conformance_tests) expands to one `#[tokio::test]` per case:
//!
//! ```ignore
//! async fn memory() -> busway_testkit::conformance::Fixture {
//!     busway_testkit::conformance::Fixture::new(std::sync::Arc::new(busway::MemoryBus::new("t")))
//! }
//! busway_testkit::conformance_tests!(memory);
//! ```
//!
//! Brokers deliver asynchronously, so expected messages are awaited with generous timeouts
//! ([`WAIT`]) and "nothing more arrives" is checked over [`QUIET`]. Every case uses its own
//! topic prefix (with a random part), so cases sharing one broker never see each other's
//! messages. In stream mode (capability `ack`) every delivery is acked.

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use busway::{
    transport::new_message_id, Bus, Capabilities, Delivery, ErrorKind, Message, Mode, Overflow,
    Pattern, StartFrom, SubscribeOptions, Subscription, Topic,
};
use bytes::Bytes;
use tokio::sync::mpsc;

/// How long a case waits for a message it expects.
pub const WAIT: Duration = Duration::from_secs(10);
/// How long a case waits to conclude that nothing more arrives.
pub const QUIET: Duration = Duration::from_millis(300);

/// One bus under test, plus whatever must live as long as it (a broker process).
pub struct Fixture {
    /// The bus under test.
    pub bus: Arc<dyn Bus>,
    /// Dropped after the case: e.g. the `ServerProcess` of the broker.
    pub guard: Option<Box<dyn Any + Send + Sync>>,
    /// How the bus was configured to dead-letter, when it was: `(max_deliveries,
    /// dead_letter topic)`. Cases about dead letters skip a fixture without it.
    pub dead_letter: Option<(u32, String)>,
}

impl fmt::Debug for Fixture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fixture")
            .field("bus", &self.bus)
            .field("guarded", &self.guard.is_some())
            .finish()
    }
}

/// What a fixture function may return: a [`Fixture`], or `None` when it cannot be made here
/// (a broker binary is missing), which skips the case.
pub trait IntoFixture {
    /// The fixture, or `None` to skip.
    fn into_fixture(self) -> Option<Fixture>;
}

impl IntoFixture for Fixture {
    fn into_fixture(self) -> Option<Fixture> {
        Some(self)
    }
}

impl IntoFixture for Option<Fixture> {
    fn into_fixture(self) -> Option<Fixture> {
        self
    }
}

impl Fixture {
    /// A fixture with nothing to keep alive besides the bus.
    pub fn new(bus: Arc<dyn Bus>) -> Fixture {
        Fixture {
            bus,
            guard: None,
            dead_letter: None,
        }
    }

    /// A fixture that keeps `guard` alive as long as the bus.
    pub fn with_guard(bus: Arc<dyn Bus>, guard: impl Any + Send + Sync) -> Fixture {
        Fixture {
            bus,
            guard: Some(Box::new(guard)),
            dead_letter: None,
        }
    }

    /// Says the bus was built with `max_deliveries` and `dead_letter = topic`.
    pub fn with_dead_letter(mut self, max_deliveries: u32, topic: &str) -> Fixture {
        self.dead_letter = Some((max_deliveries, topic.to_string()));
        self
    }

    fn caps(&self) -> Capabilities {
        self.bus.capabilities()
    }
}

/// Closes the fixture's bus after a case (the macro calls it).
pub async fn finish(f: Fixture) {
    if let Err(e) = f.bus.close().await {
        panic!("closing bus {:?} after the case failed: {e}", f.bus.name());
    }
    drop(f);
}

/// Expands to one `#[tokio::test]` per conformance case, each with a fresh fixture from
/// `$make` (a path to an `async fn() -> Fixture`), closing the bus at the end.
#[macro_export]
macro_rules! conformance_tests {
    ($make:path) => {
        $crate::conformance_tests!(@cases $make;
            payload_and_headers_intact,
            payload_too_large_is_refused,
            many_publishers_many_subscribers,
            topics_do_not_cross_talk,
            wildcard_semantics,
            consumer_groups_share_and_split,
            nack_redelivers_until_ack,
            dead_letter_after_max_deliveries,
            ack_all_settles_exactly_the_batch,
            per_publisher_order,
            stream_replay_from_beginning,
            request_reply,
            request_timeout,
            overflow_drop_newest,
            overflow_drop_oldest,
            overflow_latest,
            overflow_block_loses_nothing,
            publish_and_subscribe_after_close_fail,
            close_ends_subscriptions,
            dropped_subscription_stops_receiving,
        );
    };
    (@cases $make:path; $($case:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let Some(f) = $crate::conformance::IntoFixture::into_fixture($make().await) else {
                    // The fixture could not be made (its broker binary is missing); it said
                    // SKIPPED, and BUSWAY_REQUIRE_BROKERS=1 turns that into a failure.
                    return;
                };
                $crate::conformance::$case(&f).await;
                $crate::conformance::finish(f).await;
            }
        )*
    };
}

// ---------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------

/// A topic prefix unique to this case and run.
fn prefix(case: &str) -> String {
    format!("ct{}.{case}", &new_message_id()[..10])
}

fn topic(s: &str) -> Topic {
    Topic::new(s).unwrap_or_else(|e| panic!("test topic {s:?}: {e}"))
}

fn pattern(s: &str) -> Pattern {
    Pattern::new(s).unwrap_or_else(|e| panic!("test pattern {s:?}: {e}"))
}

fn skipped(case: &str, why: impl fmt::Display) {
    eprintln!("SKIPPED {case}: {why}");
}

async fn sub(f: &Fixture, p: &str, options: SubscribeOptions) -> Subscription {
    f.bus
        .subscribe(pattern(p), options)
        .await
        .unwrap_or_else(|e| panic!("subscribe {p:?} on bus {:?}: {e}", f.bus.name()))
}

async fn publish(f: &Fixture, m: Message) {
    let t = m.topic.clone();
    f.bus
        .publish(m)
        .await
        .unwrap_or_else(|e| panic!("publish on {t} (bus {:?}): {e}", f.bus.name()));
}

async fn publish_str(f: &Fixture, t: &str, payload: impl Into<Bytes>) {
    publish(f, Message::new(topic(t), payload)).await;
}

/// The next delivery within [`WAIT`], acked; panics naming `what` otherwise.
async fn next(s: &mut Subscription, what: &str) -> Delivery {
    match s.recv_timeout(WAIT).await {
        Ok(Some(d)) => {
            if let Err(e) = d.ack().await {
                panic!("{what}: ack failed: {e}");
            }
            d
        }
        Ok(None) => panic!("{what}: the subscription ended while a message was expected"),
        Err(_) => panic!("{what}: no message within {WAIT:?}"),
    }
}

/// `n` deliveries, acked.
async fn take(s: &mut Subscription, n: usize, what: &str) -> Vec<Message> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        out.push(
            next(s, &format!("{what} (message {} of {n})", i + 1))
                .await
                .into_message(),
        );
    }
    out
}

/// Panics when anything arrives within [`QUIET`].
async fn assert_quiet(s: &mut Subscription, what: &str) {
    if let Ok(Some(d)) = s.recv_timeout(QUIET).await {
        panic!(
            "{what}: unexpected extra message on {} (payload {:?})",
            d.message().topic,
            String::from_utf8_lossy(&d.message().payload)
        );
    }
}

/// Panics when any of `subs` receives anything within one shared [`QUIET`] period.
async fn assert_all_quiet(subs: &mut [Subscription], what: &str) {
    tokio::time::sleep(QUIET).await;
    for (i, s) in subs.iter_mut().enumerate() {
        if let Ok(Some(d)) = s.recv_timeout(Duration::from_millis(1)).await {
            panic!(
                "{what}: subscription {i} ({}): unexpected extra message on {} (payload {:?})",
                s.pattern(),
                d.message().topic,
                String::from_utf8_lossy(&d.message().payload)
            );
        }
    }
}

fn text(m: &Message) -> String {
    String::from_utf8_lossy(&m.payload).into_owned()
}

/// Waits until `cond` holds, polling; panics naming `what` after [`WAIT`].
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        if tokio::time::Instant::now() > deadline {
            panic!("{what}: not reached within {WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Forwards every delivery of `s` (acked) to `tx`, tagged with `tag`, until dropped.
fn forward(
    mut s: Subscription,
    tag: usize,
    tx: mpsc::UnboundedSender<(usize, Message)>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(d) = s.recv().await {
            let _ = d.ack().await;
            if tx.send((tag, d.into_message())).is_err() {
                return;
            }
        }
    })
}

// ---------------------------------------------------------------------------------------
// cases
// ---------------------------------------------------------------------------------------

/// Payloads (empty, 1 MiB, non-UTF-8) and every header field arrive intact.
pub async fn payload_and_headers_intact(f: &Fixture) {
    let case = "payload_and_headers_intact";
    let caps = f.caps();
    let p = prefix(case);
    let t = format!("{p}.data");
    let mut s = sub(f, &t, SubscribeOptions::new()).await;

    let mut payloads: Vec<(&str, Bytes)> = vec![
        ("empty", Bytes::new()),
        (
            "non-UTF-8",
            Bytes::from_static(&[0xff, 0xfe, 0x00, 0x80, 0xc3, 0x28, 0x0a, 0x0d]),
        ),
        (
            "all byte values",
            Bytes::from((0..=255u8).collect::<Vec<u8>>()),
        ),
    ];
    let big = 1024 * 1024;
    if caps.max_payload >= big + 64 * 1024 {
        let data: Vec<u8> = (0..big).map(|i| (i * 31 % 251) as u8).collect();
        payloads.push(("1 MiB", Bytes::from(data)));
    } else {
        skipped(
            &format!("{case} (1 MiB payload)"),
            format!("max_payload is {} bytes", caps.max_payload),
        );
    }
    for (what, payload) in &payloads {
        publish(f, Message::new(topic(&t), payload.clone())).await;
        let got = next(&mut s, &format!("{case}: {what} payload")).await;
        assert_eq!(
            got.message().payload.len(),
            payload.len(),
            "{case}: {what} payload length changed"
        );
        assert!(
            got.message().payload == *payload,
            "{case}: {what} payload bytes changed"
        );
        assert_eq!(got.message().topic.as_str(), t, "{case}: topic changed");
    }

    let mut m = Message::new(topic(&t), &b"with headers"[..])
        .with_id("id-123")
        .with_content_type("application/json")
        .with_header("k1", "v1")
        .with_header("k-2", "v with spaces = and ; and \u{e9}")
        .with_header("empty", "");
    m.headers.timestamp_us = Some(1_700_000_000_123_456);
    m.headers.source = Some("conformance".into());
    m.headers.correlation_id = Some("corr-9".into());
    m.headers.reply_to = Some(topic(&format!("{p}.replies")));
    publish(f, m.clone()).await;
    let got = next(&mut s, &format!("{case}: message with headers")).await;
    assert_eq!(
        got.message().payload,
        m.payload,
        "{case}: payload with headers"
    );
    if caps.headers {
        let h = &got.message().headers;
        assert_eq!(h.id, m.headers.id, "{case}: id");
        assert_eq!(
            h.timestamp_us, m.headers.timestamp_us,
            "{case}: timestamp_us"
        );
        assert_eq!(h.source, m.headers.source, "{case}: source");
        assert_eq!(
            h.content_type, m.headers.content_type,
            "{case}: content_type"
        );
        assert_eq!(h.reply_to, m.headers.reply_to, "{case}: reply_to");
        assert_eq!(
            h.correlation_id, m.headers.correlation_id,
            "{case}: correlation_id"
        );
        for (k, v) in &m.headers.extra {
            assert_eq!(h.get(k), Some(v.as_str()), "{case}: extra header {k:?}");
        }
    } else {
        skipped(
            &format!("{case} (headers)"),
            "the bus does not carry headers",
        );
    }
    assert_quiet(&mut s, case).await;
}

/// A payload above `max_payload` is refused with `PayloadTooLarge`.
pub async fn payload_too_large_is_refused(f: &Fixture) {
    let case = "payload_too_large_is_refused";
    let max = f.caps().max_payload;
    if max > 16 * 1024 * 1024 {
        return skipped(
            case,
            format!("max_payload is {max} bytes; too large to try in a test"),
        );
    }
    let t = format!("{}.big", prefix(case));
    let err = f
        .bus
        .publish(Message::new(topic(&t), vec![0u8; max + 1]))
        .await
        .expect_err("a payload one byte over max_payload must be refused");
    assert_eq!(err.kind(), ErrorKind::PayloadTooLarge, "{case}: {err}");
}

/// 50 concurrent publishers x 100 messages reach each of 50 subscribers, nothing lost.
pub async fn many_publishers_many_subscribers(f: &Fixture) {
    let case = "many_publishers_many_subscribers";
    const PUBS: usize = 50;
    const MSGS: usize = 100;
    const SUBS: usize = 50;
    let t = format!("{}.fan", prefix(case));
    let mut readers = Vec::new();
    for i in 0..SUBS {
        let mut s = sub(
            f,
            &t,
            SubscribeOptions::new()
                .capacity(1024)
                .overflow(Overflow::Block),
        )
        .await;
        readers.push(tokio::spawn(async move {
            let mut seen = BTreeSet::new();
            while seen.len() < PUBS * MSGS {
                let d = match s.recv_timeout(WAIT).await {
                    Ok(Some(d)) => d,
                    _ => break,
                };
                let _ = d.ack().await;
                let (p, n) = text(d.message())
                    .split_once(':')
                    .map(|(a, b)| (a.parse::<usize>().unwrap(), b.parse::<usize>().unwrap()))
                    .expect("payload publisher:n");
                seen.insert((p, n));
            }
            (i, seen.len())
        }));
    }
    let mut pubs = Vec::new();
    for p in 0..PUBS {
        let bus = f.bus.clone();
        let t = topic(&t);
        pubs.push(tokio::spawn(async move {
            for n in 0..MSGS {
                bus.publish(Message::new(t.clone(), format!("{p}:{n}")))
                    .await
                    .unwrap_or_else(|e| panic!("publisher {p} message {n}: {e}"));
            }
        }));
    }
    for p in pubs {
        p.await.expect("publisher task");
    }
    for r in readers {
        let (i, got) = r.await.expect("subscriber task");
        assert_eq!(
            got,
            PUBS * MSGS,
            "{case}: subscriber {i} got {got} distinct messages of {}",
            PUBS * MSGS
        );
    }
}

/// 20 topics published concurrently: each subscriber sees only its topic, all of it.
pub async fn topics_do_not_cross_talk(f: &Fixture) {
    let case = "topics_do_not_cross_talk";
    const TOPICS: usize = 20;
    const MSGS: usize = 50;
    let p = prefix(case);
    let mut subs = Vec::new();
    for i in 0..TOPICS {
        subs.push(sub(f, &format!("{p}.t{i}"), SubscribeOptions::new()).await);
    }
    let mut pubs = Vec::new();
    for i in 0..TOPICS {
        let bus = f.bus.clone();
        let t = topic(&format!("{p}.t{i}"));
        pubs.push(tokio::spawn(async move {
            for n in 0..MSGS {
                bus.publish(Message::new(t.clone(), format!("t{i}:{n}")))
                    .await
                    .unwrap_or_else(|e| panic!("publish on {t}: {e}"));
            }
        }));
    }
    for p in pubs {
        p.await.expect("publisher task");
    }
    for (i, s) in subs.iter_mut().enumerate() {
        let got = take(s, MSGS, &format!("{case}: topic t{i}")).await;
        for (n, m) in got.iter().enumerate() {
            assert_eq!(
                m.topic.as_str(),
                format!("{p}.t{i}"),
                "{case}: subscriber of t{i} got a message of {}",
                m.topic
            );
            assert_eq!(text(m), format!("t{i}:{n}"), "{case}: payload on t{i}");
        }
    }
    assert_all_quiet(&mut subs, case).await;
}

/// `*` is exactly one token, `>` one or more trailing tokens.
pub async fn wildcard_semantics(f: &Fixture) {
    let case = "wildcard_semantics";
    if !f.caps().wildcards {
        return skipped(case, "the bus does not support wildcard subscriptions");
    }
    let p = prefix(case);
    let expectations: [(&str, &[&str]); 5] = [
        ("a.*", &["a.b"]),
        ("a.>", &["a.b", "a.b.c"]),
        ("*.c", &["x.c"]),
        ("*.b.*", &["a.b.c"]),
        (">", &["a", "a.b", "a.b.c", "x.c"]),
    ];
    let mut subs = Vec::new();
    for (pat, _) in &expectations {
        subs.push(sub(f, &format!("{p}.{pat}"), SubscribeOptions::new()).await);
    }
    for t in ["a", "a.b", "a.b.c", "x.c"] {
        publish_str(f, &format!("{p}.{t}"), t.to_string()).await;
    }
    for ((pat, expected), s) in expectations.iter().zip(subs.iter_mut()) {
        let what = format!("{case}: pattern {p}.{pat}");
        let got: BTreeSet<String> = take(s, expected.len(), &what)
            .await
            .iter()
            .map(text)
            .collect();
        let want: BTreeSet<String> = expected.iter().map(|s| s.to_string()).collect();
        assert_eq!(got, want, "{what}: wrong topics delivered");
    }
    assert_all_quiet(&mut subs, case).await;
}

/// Two groups each get every message; the members of one group split them.
pub async fn consumer_groups_share_and_split(f: &Fixture) {
    let case = "consumer_groups_share_and_split";
    let caps = f.caps();
    if !caps.groups {
        return skipped(case, "the bus does not support consumer groups");
    }
    const MSGS: usize = 40;
    let t = format!("{}.work", prefix(case));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    // tags: group * 10 + member
    for (g, group) in ["g1", "g2"].iter().enumerate() {
        for m in 0..2 {
            let s = sub(f, &t, SubscribeOptions::new().group(*group)).await;
            tasks.push(forward(s, g * 10 + m, tx.clone()));
        }
    }
    drop(tx);
    for n in 0..MSGS {
        publish_str(f, &t, format!("{n}")).await;
    }
    let mut by_tag: HashMap<usize, Vec<String>> = HashMap::new();
    let per_group = |by_tag: &HashMap<usize, Vec<String>>, g: usize| -> BTreeSet<String> {
        (0..2)
            .flat_map(|m| by_tag.get(&(g * 10 + m)).into_iter().flatten().cloned())
            .collect()
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    while per_group(&by_tag, 0).len() < MSGS || per_group(&by_tag, 1).len() < MSGS {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((tag, m))) => by_tag.entry(tag).or_default().push(text(&m)),
            _ => panic!(
                "{case}: groups got {} and {} distinct messages of {MSGS} within {WAIT:?}",
                per_group(&by_tag, 0).len(),
                per_group(&by_tag, 1).len()
            ),
        }
    }
    // Anything more in the quiet period is a duplicate.
    while let Ok(Some((tag, m))) = tokio::time::timeout(QUIET, rx.recv()).await {
        by_tag.entry(tag).or_default().push(text(&m));
    }
    for task in tasks {
        task.abort();
    }
    for g in 0..2 {
        for m in 0..2 {
            let n = by_tag.get(&(g * 10 + m)).map_or(0, Vec::len);
            assert!(
                n > 0,
                "{case}: member {m} of group g{} received nothing; members must split the messages",
                g + 1
            );
        }
        let total: usize = (0..2)
            .map(|m| by_tag.get(&(g * 10 + m)).map_or(0, Vec::len))
            .sum();
        if caps.mode == Mode::Broadcast {
            assert_eq!(
                total,
                MSGS,
                "{case}: group g{} received {total} deliveries for {MSGS} messages (duplicates)",
                g + 1
            );
        }
    }
}

/// A message nacked `max_deliveries` times goes to the dead-letter topic, once, with its
/// payload, and is not delivered to the group again; the bus counts it in `dead_lettered`.
pub async fn dead_letter_after_max_deliveries(f: &Fixture) {
    let case = "dead_letter_after_max_deliveries";
    if !f.caps().ack {
        return skipped(case, "the bus has no acks (broadcast mode)");
    }
    let Some((max, dlq)) = f.dead_letter.clone() else {
        return skipped(case, "the fixture configures no dead letter");
    };
    let t = format!("{}.job", prefix(case));
    let mut dead = sub(
        f,
        &dlq,
        SubscribeOptions::new()
            .group("dlq-readers")
            .start(StartFrom::Beginning),
    )
    .await;
    let mut s = sub(f, &t, SubscribeOptions::new().group("workers")).await;
    let before = f.bus.stats().dead_lettered;
    publish_str(f, &t, "poison").await;
    for round in 1..=max {
        let d = match s.recv_timeout(WAIT).await {
            Ok(Some(d)) => d,
            other => panic!("{case}: delivery {round} of {max} did not come: {other:?}"),
        };
        assert_eq!(text(d.message()), "poison", "{case}: delivery {round}");
        d.nack()
            .await
            .unwrap_or_else(|e| panic!("{case}: nack {round}: {e}"));
    }
    let d = match dead.recv_timeout(WAIT).await {
        Ok(Some(d)) => d,
        other => panic!("{case}: nothing reached the dead-letter topic {dlq:?}: {other:?}"),
    };
    assert_eq!(text(d.message()), "poison", "{case}: dead-lettered payload");
    d.ack().await.unwrap_or_else(|e| panic!("{case}: ack: {e}"));
    assert_quiet(&mut s, case).await;
    wait_until(&format!("{case}: dead_lettered counted"), || {
        f.bus.stats().dead_lettered > before
    })
    .await;
}

/// A nacked delivery comes back (attempt counted) until it is acked.
pub async fn nack_redelivers_until_ack(f: &Fixture) {
    let case = "nack_redelivers_until_ack";
    if !f.caps().ack {
        return skipped(case, "the bus has no acks (broadcast mode)");
    }
    let t = format!("{}.job", prefix(case));
    let mut s = sub(f, &t, SubscribeOptions::new().group("workers")).await;
    let before = f.bus.stats().redelivered;
    publish_str(f, &t, "job-1").await;
    let mut last_attempt = 0;
    for round in 1..=3 {
        let d = match s.recv_timeout(WAIT).await {
            Ok(Some(d)) => d,
            other => panic!("{case}: delivery {round} did not come: {other:?}"),
        };
        assert_eq!(
            text(d.message()),
            "job-1",
            "{case}: payload of delivery {round}"
        );
        assert!(d.is_ackable(), "{case}: stream deliveries must be ackable");
        assert!(
            d.attempt() > last_attempt,
            "{case}: attempt {} after {last_attempt}",
            d.attempt()
        );
        last_attempt = d.attempt();
        if round < 3 {
            d.nack()
                .await
                .unwrap_or_else(|e| panic!("{case}: nack: {e}"));
        } else {
            d.ack().await.unwrap_or_else(|e| panic!("{case}: ack: {e}"));
        }
    }
    assert!(
        last_attempt >= 3,
        "{case}: third delivery has attempt {last_attempt}"
    );
    let stats = f.bus.stats();
    assert!(
        stats.nacked >= 2 && stats.acked >= 1,
        "{case}: stats count the nacks and the ack: {stats:?}"
    );
    assert_quiet(&mut s, case).await;
    let redelivered = f.bus.stats().redelivered - before;
    assert!(
        redelivered >= 2,
        "{case}: stats count {redelivered} redeliveries after two nacks"
    );
}

/// `Delivery::ack_all` acks exactly the deliveries it is given: those are never delivered
/// again, the others of the same read come back after the ack timeout. In broadcast mode it
/// is an `Ok` no-op.
pub async fn ack_all_settles_exactly_the_batch(f: &Fixture) {
    let case = "ack_all_settles_exactly_the_batch";
    let t = format!("{}.job", prefix(case));
    if !f.caps().ack {
        let mut s = sub(f, &t, SubscribeOptions::new()).await;
        publish_str(f, &t, "x").await;
        let d = match s.recv_timeout(WAIT).await {
            Ok(Some(d)) => d,
            other => panic!("{case}: the delivery did not come: {other:?}"),
        };
        Delivery::ack_all([&d])
            .await
            .unwrap_or_else(|e| panic!("{case}: ack_all in broadcast mode: {e}"));
        return skipped(case, "the bus has no acks (broadcast mode)");
    }
    let timeout = Duration::from_secs(1);
    let mut s = sub(
        f,
        &t,
        SubscribeOptions::new().group("batch").ack_timeout(timeout),
    )
    .await;
    let n = 20;
    for i in 0..n {
        publish_str(f, &t, format!("job-{i}")).await;
    }
    let mut batch = Vec::new();
    while batch.len() < n {
        match s.recv_timeout(WAIT).await {
            Ok(Some(d)) => batch.push(d),
            other => panic!(
                "{case}: delivery {} of {n} did not come: {other:?}",
                batch.len() + 1
            ),
        }
    }
    // Ack the first 15 in one call; leave 5 unacked.
    let (acked, left) = batch.split_at(15);
    let acked_before = f.bus.stats().acked;
    Delivery::ack_all(acked)
        .await
        .unwrap_or_else(|e| panic!("{case}: ack_all: {e}"));
    assert_eq!(
        f.bus.stats().acked - acked_before,
        15,
        "{case}: stats().acked counts the batch"
    );
    let mut want: BTreeSet<String> = left.iter().map(|d| text(d.message())).collect();
    let mut again = Vec::new();
    while !want.is_empty() {
        match s.recv_timeout(WAIT).await {
            Ok(Some(d)) => {
                let p = text(d.message());
                assert!(
                    want.remove(&p),
                    "{case}: {p:?} was delivered again although ack_all acked it (or twice)"
                );
                assert!(
                    d.attempt() >= 2,
                    "{case}: redelivery of {p:?} has attempt {}",
                    d.attempt()
                );
                again.push(d);
            }
            other => panic!("{case}: the unacked {want:?} did not come back: {other:?}"),
        }
    }
    Delivery::ack_all(&again)
        .await
        .unwrap_or_else(|e| panic!("{case}: ack_all of the redeliveries: {e}"));
    assert_eq!(
        f.bus.stats().acked - acked_before,
        20,
        "{case}: stats().acked counts every delivery acked"
    );
    drop(batch);
    // Past another ack timeout nothing comes back: every delivery is settled.
    if let Ok(Some(d)) = s.recv_timeout(timeout * 2 + QUIET).await {
        panic!(
            "{case}: {:?} delivered again (attempt {}) after ack_all",
            text(d.message()),
            d.attempt()
        );
    }
}

/// Messages of each publisher on one topic arrive in publish order.
pub async fn per_publisher_order(f: &Fixture) {
    let case = "per_publisher_order";
    const PUBS: usize = 4;
    const MSGS: usize = 200;
    let t = format!("{}.ordered", prefix(case));
    let mut s = sub(
        f,
        &t,
        SubscribeOptions::new()
            .capacity(PUBS * MSGS)
            .overflow(Overflow::Block),
    )
    .await;
    let mut pubs = Vec::new();
    for p in 0..PUBS {
        let bus = f.bus.clone();
        let t = topic(&t);
        pubs.push(tokio::spawn(async move {
            for n in 0..MSGS {
                bus.publish(Message::new(t.clone(), format!("{p}:{n}")))
                    .await
                    .unwrap_or_else(|e| panic!("publisher {p}: {e}"));
            }
        }));
    }
    let mut last: BTreeMap<usize, usize> = BTreeMap::new();
    for m in take(&mut s, PUBS * MSGS, case).await {
        let payload = text(&m);
        let (p, n) = payload.split_once(':').expect("publisher:n");
        let (p, n): (usize, usize) = (p.parse().unwrap(), n.parse().unwrap());
        let expected = last.get(&p).map_or(0, |l| l + 1);
        assert_eq!(
            n, expected,
            "{case}: publisher {p}: got {n} after {expected} was due"
        );
        last.insert(p, n);
    }
    for p in pubs {
        p.await.expect("publisher task");
    }
}

/// A subscription starting from the beginning replays the retained log; one starting
/// with new messages sees only later ones.
pub async fn stream_replay_from_beginning(f: &Fixture) {
    let case = "stream_replay_from_beginning";
    if !f.caps().replay {
        return skipped(case, "the bus cannot replay (broadcast mode)");
    }
    let t = format!("{}.log", prefix(case));
    for n in 0..5 {
        publish_str(f, &t, format!("old-{n}")).await;
    }
    let mut replay = sub(f, &t, SubscribeOptions::new().start(StartFrom::Beginning)).await;
    let got: Vec<String> = take(&mut replay, 5, case).await.iter().map(text).collect();
    let want: Vec<String> = (0..5).map(|n| format!("old-{n}")).collect();
    assert_eq!(got, want, "{case}: replayed entries");

    let mut fresh = sub(f, &t, SubscribeOptions::new().start(StartFrom::New)).await;
    publish_str(f, &t, "new-0").await;
    let m = next(&mut fresh, &format!("{case}: new-only subscription")).await;
    assert_eq!(
        text(m.message()),
        "new-0",
        "{case}: a new-only subscription replayed old entries"
    );
    let m = next(&mut replay, &format!("{case}: replaying subscription")).await;
    assert_eq!(text(m.message()), "new-0", "{case}: replay then live");
    assert_quiet(&mut fresh, case).await;
    assert_quiet(&mut replay, case).await;
}

/// A request gets the responder's reply, correlated.
pub async fn request_reply(f: &Fixture) {
    let case = "request_reply";
    if !f.caps().request_reply {
        return skipped(case, "the bus does not support request/reply");
    }
    let t = format!("{}.echo", prefix(case));
    let mut s = sub(f, &t, SubscribeOptions::new()).await;
    let responder = tokio::spawn(async move {
        while let Some(d) = s.recv().await {
            let _ = d.ack().await;
            let answer = format!("pong:{}", String::from_utf8_lossy(&d.message().payload));
            if let Err(e) = d.reply(answer).await {
                panic!("reply failed: {e}");
            }
        }
    });
    for n in 0..3 {
        let mut m = Message::new(topic(&t), format!("ping{n}"));
        m.headers.correlation_id = Some(format!("c{n}"));
        let reply = f
            .bus
            .request(m, WAIT)
            .await
            .unwrap_or_else(|e| panic!("{case}: request {n}: {e}"));
        assert_eq!(
            text(&reply),
            format!("pong:ping{n}"),
            "{case}: reply payload"
        );
        if f.caps().headers {
            assert_eq!(
                reply.headers.correlation_id.as_deref(),
                Some(format!("c{n}").as_str()),
                "{case}: reply correlation id"
            );
        }
    }
    responder.abort();
}

/// A request nobody answers fails with `Timeout` (or `NoResponders`), in about its timeout.
pub async fn request_timeout(f: &Fixture) {
    let case = "request_timeout";
    if !f.caps().request_reply {
        return skipped(case, "the bus does not support request/reply");
    }
    let p = prefix(case);
    let err = f
        .bus
        .request(Message::new(topic(&format!("{p}.nobody")), "x"), QUIET)
        .await
        .expect_err("a request nobody listens to must fail");
    assert!(
        matches!(err.kind(), ErrorKind::Timeout | ErrorKind::NoResponders),
        "{case}: request with no subscriber: expected Timeout or NoResponders, got {:?}: {err}",
        err.kind()
    );
    // Somebody listens but never answers: only a timeout can tell.
    let t = format!("{p}.silent");
    let _silent = sub(f, &t, SubscribeOptions::new()).await;
    let err = tokio::time::timeout(WAIT, f.bus.request(Message::new(topic(&t), "x"), QUIET))
        .await
        .unwrap_or_else(|_| panic!("{case}: request with a {QUIET:?} timeout hung for {WAIT:?}"))
        .expect_err("a request nobody answers must fail");
    assert_eq!(
        err.kind(),
        ErrorKind::Timeout,
        "{case}: silent responder: {err}"
    );
}

/// Publishes `n` messages `0..n` on `t` and waits until the subscription has taken all of
/// them into its queue (queued or dropped by its policy).
async fn fill(f: &Fixture, s: &Subscription, t: &str, n: usize, what: &str) {
    for i in 0..n {
        publish_str(f, t, format!("{i}")).await;
    }
    wait_until(what, || s.pending() as u64 + s.stats().dropped >= n as u64).await;
}

/// `drop_newest` keeps the first `capacity` messages and counts the rest as dropped.
pub async fn overflow_drop_newest(f: &Fixture) {
    let case = "overflow_drop_newest";
    let t = format!("{}.q", prefix(case));
    let mut s = sub(
        f,
        &t,
        SubscribeOptions::new()
            .capacity(5)
            .overflow(Overflow::DropNewest),
    )
    .await;
    let before = f.bus.stats().dropped;
    fill(f, &s, &t, 20, case).await;
    assert_eq!(s.stats().dropped, 15, "{case}: subscription drop count");
    assert!(
        f.bus.stats().dropped - before >= 15,
        "{case}: bus drop count {} - {before}",
        f.bus.stats().dropped
    );
    let got: Vec<String> = take(&mut s, 5, case).await.iter().map(text).collect();
    assert_eq!(got, ["0", "1", "2", "3", "4"], "{case}: kept messages");
    assert_quiet(&mut s, case).await;
}

/// `drop_oldest` keeps the last `capacity` messages and counts the rest as dropped.
pub async fn overflow_drop_oldest(f: &Fixture) {
    let case = "overflow_drop_oldest";
    let t = format!("{}.q", prefix(case));
    let mut s = sub(
        f,
        &t,
        SubscribeOptions::new()
            .capacity(5)
            .overflow(Overflow::DropOldest),
    )
    .await;
    fill(f, &s, &t, 20, case).await;
    wait_until(case, || s.stats().dropped >= 15).await;
    assert_eq!(s.stats().dropped, 15, "{case}: subscription drop count");
    let got: Vec<String> = take(&mut s, 5, case).await.iter().map(text).collect();
    assert_eq!(got, ["15", "16", "17", "18", "19"], "{case}: kept messages");
    // In stream mode the dropped entries stay unacked and come back after the ack timeout
    // (30 s by default), well after this case.
    assert_quiet(&mut s, case).await;
}

/// `latest` keeps only the newest queued message per topic.
pub async fn overflow_latest(f: &Fixture) {
    let case = "overflow_latest";
    if !f.caps().wildcards {
        return skipped(case, "needs a wildcard subscription over several topics");
    }
    let p = prefix(case);
    let mut s = sub(
        f,
        &format!("{p}.px.*"),
        SubscribeOptions::new()
            .capacity(8)
            .overflow(Overflow::Latest),
    )
    .await;
    for round in 0..10 {
        for sym in ["AAA", "BBB", "CCC"] {
            publish_str(f, &format!("{p}.px.{sym}"), format!("{sym}-{round}")).await;
        }
    }
    wait_until(case, || s.pending() as u64 + s.stats().dropped >= 30).await;
    assert_eq!(
        s.stats().dropped,
        27,
        "{case}: replaced messages are counted as dropped"
    );
    let got: BTreeSet<String> = take(&mut s, 3, case).await.iter().map(text).collect();
    let want: BTreeSet<String> = ["AAA-9", "BBB-9", "CCC-9"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(got, want, "{case}: the newest message of each topic");
    assert_quiet(&mut s, case).await;
}

/// `block` never drops: the queue holds `capacity`, the rest waits, and everything arrives
/// in order once the subscriber reads.
pub async fn overflow_block_loses_nothing(f: &Fixture) {
    let case = "overflow_block_loses_nothing";
    const N: usize = 30;
    let t = format!("{}.q", prefix(case));
    let mut s = sub(
        f,
        &t,
        SubscribeOptions::new()
            .capacity(4)
            .overflow(Overflow::Block),
    )
    .await;
    let bus = f.bus.clone();
    let tt = topic(&t);
    let publisher = tokio::spawn(async move {
        for i in 0..N {
            bus.publish(Message::new(tt.clone(), format!("{i}")))
                .await
                .unwrap_or_else(|e| panic!("publish {i}: {e}"));
        }
    });
    wait_until(&format!("{case}: queue fills"), || s.pending() >= 4).await;
    tokio::time::sleep(QUIET).await;
    assert!(s.pending() <= 4, "{case}: queue of 4 holds {}", s.pending());
    assert_eq!(s.stats().dropped, 0, "{case}: block dropped messages");
    let got: Vec<String> = take(&mut s, N, case).await.iter().map(text).collect();
    let want: Vec<String> = (0..N).map(|i| i.to_string()).collect();
    assert_eq!(got, want, "{case}: every message, in order");
    tokio::time::timeout(WAIT, publisher)
        .await
        .unwrap_or_else(|_| panic!("{case}: publisher still blocked after the queue drained"))
        .expect("publisher task");
    assert_eq!(s.stats().dropped, 0, "{case}: block dropped messages");
}

/// After `close`, publish and subscribe fail with `Closed`; close is idempotent.
pub async fn publish_and_subscribe_after_close_fail(f: &Fixture) {
    let case = "publish_and_subscribe_after_close_fail";
    let t = format!("{}.x", prefix(case));
    f.bus
        .close()
        .await
        .unwrap_or_else(|e| panic!("{case}: close: {e}"));
    let err = f
        .bus
        .publish(Message::new(topic(&t), "late"))
        .await
        .expect_err("publish after close must fail");
    assert_eq!(
        err.kind(),
        ErrorKind::Closed,
        "{case}: publish after close: {err}"
    );
    let err = f
        .bus
        .subscribe(pattern(&t), SubscribeOptions::new())
        .await
        .expect_err("subscribe after close must fail");
    assert_eq!(
        err.kind(),
        ErrorKind::Closed,
        "{case}: subscribe after close: {err}"
    );
    f.bus
        .close()
        .await
        .unwrap_or_else(|e| panic!("{case}: a second close must succeed: {e}"));
}

/// Closing the bus ends every open subscription.
pub async fn close_ends_subscriptions(f: &Fixture) {
    let case = "close_ends_subscriptions";
    let p = prefix(case);
    let mut subs = vec![sub(f, &format!("{p}.a"), SubscribeOptions::new()).await];
    if f.caps().wildcards {
        subs.push(sub(f, &format!("{p}.>"), SubscribeOptions::new()).await);
    }
    if f.caps().groups {
        subs.push(sub(f, &format!("{p}.a"), SubscribeOptions::new().group("g")).await);
    }
    f.bus
        .close()
        .await
        .unwrap_or_else(|e| panic!("{case}: close: {e}"));
    for (i, s) in subs.iter_mut().enumerate() {
        loop {
            match s.recv_timeout(WAIT).await {
                Ok(None) => break,
                Ok(Some(_)) => continue,
                Err(_) => panic!(
                    "{case}: subscription {i} ({}) still open {WAIT:?} after close",
                    s.pattern()
                ),
            }
        }
    }
}

/// A dropped subscription stops receiving; publishing afterwards still works and counts no
/// drops for it.
pub async fn dropped_subscription_stops_receiving(f: &Fixture) {
    let case = "dropped_subscription_stops_receiving";
    let t = format!("{}.x", prefix(case));
    let gone = sub(
        f,
        &t,
        SubscribeOptions::new()
            .capacity(1)
            .overflow(Overflow::DropNewest),
    )
    .await;
    let mut kept = sub(f, &t, SubscribeOptions::new()).await;
    publish_str(f, &t, "before").await;
    let m = next(&mut kept, case).await;
    assert_eq!(text(m.message()), "before", "{case}");
    drop(gone);
    let dropped = f.bus.stats().dropped;
    for i in 0..20 {
        publish_str(f, &t, format!("{i}")).await;
    }
    let got: Vec<String> = take(&mut kept, 20, case).await.iter().map(text).collect();
    assert_eq!(
        got,
        (0..20).map(|i| i.to_string()).collect::<Vec<_>>(),
        "{case}"
    );
    assert_eq!(
        f.bus.stats().dropped,
        dropped,
        "{case}: messages were counted as dropped for a subscription that is gone"
    );
    assert_quiet(&mut kept, case).await;
}
